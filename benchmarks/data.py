"""The suite's data: CIFAR-10 subsets, their label noise, and the manifests irank reads.

    python benchmarks/data.py        # idempotent: unpacks, trains the auxiliary model once, writes manifests

From ../shared/data/cifar10 (or $IRANK_CIFAR_ARCHIVES) into $IRANK_BENCH/data/cifar10; per class, a seeded
permutation of the 5,000 training images gives three disjoint parts:
  train  1,000 a class (10,000 rows): the rows every base trains on, under each noise below
  val      100 a class: a clean validation set (early stopping)
  aux    2,000 a class, clean: trains the auxiliary model of the human-like noise, never seen by a base
and the 10,000 test images. Manifests (`path,label,true_label`, paths relative to their folder):
  train-clean, train-sym20, train-sym40 (a uniformly chosen other class), train-pair40 (40% of truck,
  bird, deer, cat, dog flipped to automobile, airplane, horse, dog, cat: 20% of all rows),
  train-idn20, train-idn40 (human-like: in each class, the share of its rows that the auxiliary model finds
  most confusing take the other class it finds most likely), val.csv, test.csv, aux.csv.
The pixels are also cached as uint8 arrays (images-SPLIT.npy) so the training loop decodes no JPEG per epoch.
"""

from __future__ import annotations

import os
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLASSES, DATA, threads, write_json  # noqa: E402
from recipes import AUG, accuracy, fit, predict  # noqa: E402

ARCHIVES = Path(os.environ.get("IRANK_CIFAR_ARCHIVES") or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")
PARTS = {"train": 1000, "val": 100, "aux": 2000}  # images per class
PAIRS = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}
NOISES = ("clean", "sym20", "sym40", "pair40", "idn20", "idn40")
SEED = 0


def unpack() -> None:
    """Unpack the shared archives once (about 100 MB of JPEG files)."""
    for split in ("train", "test"):
        if not (DATA / split).is_dir():
            DATA.mkdir(parents=True, exist_ok=True)
            with tarfile.open(ARCHIVES / f"{split}.tar.gz") as archive:
                archive.extractall(DATA, filter="data")


def split_rows() -> dict[str, pd.DataFrame]:
    """The train, val and aux parts of the 50k images (path, true label); train rows in a shuffled order."""
    rng = np.random.default_rng(SEED)
    parts = {name: [] for name in PARTS}
    for name in CLASSES:
        files = sorted((DATA / "train" / name).glob("*.jpg"))
        picked = rng.permutation(len(files))
        start = 0
        for part, count in PARTS.items():
            parts[part] += [(f"train/{name}/{files[i].name}", name) for i in picked[start:start + count]]
            start += count
    tables = {part: pd.DataFrame(rows, columns=["path", "true_label"]) for part, rows in parts.items()}
    tables["train"] = tables["train"].iloc[rng.permutation(len(tables["train"]))].reset_index(drop=True)
    test = [(f"test/{name}/{f.name}", name) for name in CLASSES for f in sorted((DATA / "test" / name).glob("*.jpg"))]
    tables["test"] = pd.DataFrame(test, columns=["path", "true_label"])
    return tables


def images(split: str, paths: list[str] | None = None) -> torch.Tensor:
    """The split's pixels as a uint8 N×3×32×32 tensor, decoded once and cached as images-SPLIT.npy."""
    cache = DATA / f"images-{split}.npy"
    if not cache.exists():
        decoded = np.stack([np.asarray(Image.open(DATA / p).convert("RGB")) for p in paths])
        np.save(cache, decoded.transpose(0, 3, 1, 2).copy())
    return torch.from_numpy(np.load(cache))


def labels_of(table: pd.DataFrame, column: str = "true_label") -> torch.Tensor:
    """A manifest's class names in `column` as class indices."""
    return torch.tensor([CLASSES.index(name) for name in table[column]])


def symmetric(truth: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """A `rate` share of the rows, chosen uniformly, moved to a uniformly chosen other class."""
    labels = truth.copy()
    chosen = rng.choice(len(truth), size=int(round(rate * len(truth))), replace=False)
    labels[chosen] = (truth[chosen] + rng.integers(1, len(CLASSES), len(chosen))) % len(CLASSES)
    return labels


def pair_flips(truth: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """`rate` of each source class of PAIRS flipped to its pair; the other classes stay clean."""
    labels = truth.copy()
    for source, target in PAIRS.items():
        members = np.flatnonzero(truth == CLASSES.index(source))
        chosen = rng.choice(members, size=int(round(rate * len(members))), replace=False)
        labels[chosen] = CLASSES.index(target)
    return labels


def human_like(truth: np.ndarray, rate: float, probs: np.ndarray) -> np.ndarray:
    """In each class, the `rate` share of its rows whose most likely other class (under a model that never saw
    them) is most likely get that class: plausible mistakes between similar-looking classes, per image."""
    labels = truth.copy()
    other = probs.copy()
    other[np.arange(len(truth)), truth] = -1
    confusion, guess = other.max(1), other.argmax(1)
    for label in range(len(CLASSES)):
        members = np.flatnonzero(truth == label)
        count = int(round(rate * len(members)))
        chosen = members[np.lexsort((members, -confusion[members]))[:count]]
        labels[chosen] = guess[chosen]
    return labels


def auxiliary_probs(tables: dict[str, pd.DataFrame]) -> np.ndarray:
    """Softmax of the auxiliary model (aug-onecycle, 20 epochs on the clean aux part) on the train rows;
    trained once, cached as aux-probs-train.npy with its facts in aux.json."""
    cache = DATA / "aux-probs-train.npy"
    if cache.exists():
        return np.load(cache)
    torch.set_num_threads(threads())
    aux_images, aux_labels = images("aux", list(tables["aux"].path)), labels_of(tables["aux"])
    model, history = fit(replace(AUG, epochs=20), aux_images, aux_labels, seed=SEED)
    test = accuracy(model, images("test", list(tables["test"].path)), labels_of(tables["test"]))
    probs = torch.softmax(predict(model, images("train", list(tables["train"].path))), 1).numpy()
    write_json(DATA / "aux.json", {"rows": len(aux_labels), "test_accuracy": test, "epochs": history})
    np.save(cache, probs)
    return probs


def noisy_labels(noise: str, truth: np.ndarray, aux: np.ndarray) -> np.ndarray:
    """The given labels of one noise setting; each setting has its own seeded generator."""
    rng = np.random.default_rng(SEED + 1 + NOISES.index(noise))
    if noise == "clean":
        return truth.copy()
    rate = int(noise[-2:]) / 100
    if noise.startswith("sym"):
        return symmetric(truth, rate, rng)
    if noise.startswith("pair"):
        return pair_flips(truth, rate, rng)
    return human_like(truth, rate, aux)


def write_manifests() -> dict[str, Path]:
    """Every manifest of the suite (see the module's docstring); returns name → path."""
    unpack()
    tables = split_rows()
    for split in ("train", "val", "test"):
        images(split, list(tables[split].path))
    aux = auxiliary_probs(tables)
    truth = labels_of(tables["train"]).numpy()
    out = {}
    for noise in NOISES:
        given = np.array(CLASSES)[noisy_labels(noise, truth, aux)]
        frame = pd.DataFrame({"path": tables["train"].path, "label": given, "true_label": tables["train"].true_label})
        out[noise] = DATA / f"train-{noise}.csv"
        frame.to_csv(out[noise], index=False)
    for split in ("val", "test", "aux"):
        frame = tables[split].assign(label=tables[split].true_label)[["path", "label", "true_label"]]
        out[split] = DATA / f"{split}.csv"
        frame.to_csv(out[split], index=False)
    return out


if __name__ == "__main__":
    for name, path in write_manifests().items():
        frame = pd.read_csv(path)
        print(f"{name:8} {path}  rows {len(frame):6}  wrong {(frame.label != frame.true_label).mean():.3f}")
