"""The suite's bases: checkpoints trained the way users train, on noisy labels, that irank reads with no flags.

    python benchmarks/bases.py NAME      # train one base (skipped when its checkpoint exists)
    python benchmarks/bases.py --list    # the bases, most informative first, and which exist
    python benchmarks/bases.py --names   # their names only (for benchmarks/queue.sh)

Each base is $IRANK_BENCH/bases/NAME.safetensors (irank metadata: arch, classes, head `fc`, the cifar10
preprocessing) with NAME.json: its recipe, the real noise rate, its fit to its own labels (all, and the
wrong ones: how much it memorized), test accuracy (this loop's and `irank eval`'s, which must agree) and
time. Per-sample outputs for later method work go to outputs/NAME/: the base's logits on the train rows
and the margin of each row's given label at every step of its training (the user's own training's AUM).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BASES, CLASSES, DATA, OUTPUTS, PREPROCESS, threads, write_json  # noqa: E402
from data import images, labels_of  # noqa: E402
from recipes import RECIPES, accuracy, fit, predict  # noqa: E402

# irank's checkpoint writer; irank's internal modules are being reorganized, so this import may move
from irank.model.checkpoint import save_checkpoint  # noqa: E402

# (recipe, noise), the most informative first: the queue trains them in this order
ORDER = [
    ("aug-onecycle", "idn40"), ("plain-sgd", "sym40"), ("aug-onecycle", "idn20"), ("plain-sgd", "idn40"),
    ("aug-onecycle", "clean"), ("gce", "idn40"), ("resnet18", "idn40"), ("aug-onecycle", "sym20"),
    ("label-smoothing", "idn40"), ("early-stopped", "idn40"), ("mixup", "sym40"), ("strong-wd", "idn20"),
    ("aug-cosine", "pair40"), ("plain-sgd", "clean"),
]
NAMES = [f"{recipe}-{noise}" for recipe, noise in ORDER]


def parse(name: str) -> tuple[str, str]:
    """NAME → (recipe, noise)."""
    recipe, _, noise = name.rpartition("-")
    if recipe not in RECIPES:
        raise SystemExit(f"{name}: unknown base (known: {', '.join(NAMES)})")
    return recipe, noise


def train_rows(noise: str) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The noise's manifest, the train pixels, the given labels and the true labels."""
    table = pd.read_csv(DATA / f"train-{noise}.csv")
    return table, images("train"), labels_of(table, "label"), labels_of(table, "true_label")


class MarginLog:
    """The margin of each row's given label (its logit minus the largest other) in every epoch of a training:
    averaged over the epochs it is the area under the margin (Pleiss et al. 2020)."""

    def __init__(self, labels: torch.Tensor, epochs: int):
        self.labels = labels
        self.margins = np.zeros((epochs, len(labels)), np.float32)

    def __call__(self, epoch: int, rows: torch.Tensor, logits: torch.Tensor) -> None:
        given = logits.gather(1, self.labels[rows].view(-1, 1)).squeeze(1)
        other = logits.scatter(1, self.labels[rows].view(-1, 1), float("-inf")).max(1).values
        self.margins[epoch, rows.numpy()] = (given - other).numpy()


def irank_eval(checkpoint: Path, manifest: Path) -> float:
    """Test accuracy as irank computes it (its own JPEG decoding and preprocessing from the metadata)."""
    import json

    done = subprocess.run(["irank", "eval", str(checkpoint), str(manifest), "--json"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"irank eval {checkpoint} failed ({done.returncode}): {done.stderr[-2000:]}")
    return float(json.loads(done.stdout)["accuracy"])


def facts(model, given, truth, test, val, history, seconds) -> dict:
    """What the report says of a base: noise rate, fit to its own labels, accuracies, time."""
    predicted = predict(model, images("train")).argmax(1)
    wrong = given != truth
    return {
        "rows": len(given), "wrong": int(wrong.sum()), "noise_rate": float(wrong.float().mean()),
        "fit": float((predicted == given).float().mean()),
        "fit_wrong": float((predicted[wrong] == given[wrong]).float().mean()) if wrong.any() else None,
        "train_true_accuracy": float((predicted == truth).float().mean()),
        "test_accuracy": accuracy(model, *test), "val_accuracy": accuracy(model, *val),
        "train_seconds": seconds, "epochs": history,
    }


def train_base(name: str) -> dict:
    """Train one base with its recipe on its noisy labels; write the checkpoint, its facts and outputs."""
    recipe_name, noise = parse(name)
    recipe = RECIPES[recipe_name]
    checkpoint = BASES / f"{name}.safetensors"
    _, train, given, truth = train_rows(noise)
    test = (images("test"), labels_of(pd.read_csv(DATA / "test.csv")))
    val = (images("val"), labels_of(pd.read_csv(DATA / "val.csv")))
    margins = MarginLog(given, recipe.epochs)
    started = time.perf_counter()
    model, history = fit(recipe, train, given, val=val, on_batch=margins)
    seconds = time.perf_counter() - started
    out = OUTPUTS / name
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "base-train-margins.npy", margins.margins.astype(np.float16))
    np.save(out / "base-train-logits.npy", predict(model, train).numpy())
    metadata = {"format": 1, "arch": recipe.arch, "classes": CLASSES, "head": "fc", "preprocess": PREPROCESS,
                "bench": {"recipe": recipe_name, "noise": noise}}
    BASES.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, str(checkpoint), metadata)
    result = {"name": name, "recipe_name": recipe_name, "recipe": recipe.to_dict(), "noise": noise,
              **facts(model, given, truth, test, val, history, seconds)}
    result["irank_test_accuracy"] = irank_eval(checkpoint, DATA / "test.csv")
    write_json(BASES / f"{name}.json", result)
    return result


def main(argv: list[str]) -> None:
    """List the bases, or train each one named that is not trained yet."""
    if argv == ["--names"]:
        print(" ".join(NAMES))
        return
    if argv == ["--list"]:
        for name in NAMES:
            print(f"{name:28} {'done' if (BASES / f'{name}.json').exists() else '-'}")
        return
    torch.set_num_threads(threads())
    for name in argv:
        parse(name)
        if (BASES / f"{name}.json").exists():
            print(f"{name}: done already")
            continue
        result = train_base(name)
        fit_wrong = "—" if result["fit_wrong"] is None else f"{result['fit_wrong']:.3f}"
        print(f"{name}: noise {result['noise_rate']:.3f}, fit {result['fit']:.3f} (wrong labels {fit_wrong}), "
              f"test {result['test_accuracy']:.4f} (irank eval {result['irank_test_accuracy']:.4f}), "
              f"{result['train_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
