"""`score` and `refine` on a GPU against plain loops over the same DataLoader, in one run (not run by CI).

    python benchmarks/cifar/cifar_data.py                       # once: CIFAR-10 into bench-data/cifar10
    python benchmarks/cost/gpu_cost.py --json bench-out/gpu_cost.json [--repeats 3] [--sections small,refine,big,agree,torchrun]

Made for a short lease on a GPU machine: sections run in the order given, each result is written to the JSON
file as soon as it is measured, and a section that would start after `--deadline` seconds is skipped.

- small: the CIFAR benchmark's small-cnn (`bench-out/base/ce-sym40.safetensors`, trained here as
  benchmarks/cifar/train_bases.sh trains it when missing) on all 50,000 CIFAR-10 training images, batch 256, loader
  workers `auto`. Timed in turn, `--repeats` times each: a plain `model(x)` loop in the default layout and full
  precision (the issue's baseline), the same loop in the placement `score` uses (channels-last, bf16 autocast on
  CUDA), `irank score --boundary head`, and `irank score` with its defaults; both write their table. Every
  plain loop synchronizes the device before its clock stops; `score` gets its outputs back on the host.
- big: the same on a GPU-bound pass: torchvision's resnet50 (random weights, one epoch on 1,024 images) at
  224×224 (`--preprocess imagenet`: the CIFAR images resized) on the 10,000-image subset.
- refine: `refine --scope full` against a plain training loop over the same shuffled loader with the same SGD
  settings: small-cnn on the 50,000 images (2 epochs), resnet50 at 224 on 10,000 (1 epoch).
- agree: `score` (head and default) of small-cnn on the 10,000-image subset on the CPU, on the GPU in full
  precision, and on the GPU in bf16: detection of the wrong labels (AUROC, precision at k) and agreement with
  the CPU's scores.
- fits: the refit boundary's probe fits (the final fit, the layer choice), which `score` runs on the CPU, on
  the CPU and on the GPU (`device=` of `irank.core.linear.fit_with_scaling` and `irank.core.layer_choice.choose_layer`),
  on Gaussian features of the benchmark's shapes: whether moving them to the GPU pays.
- torchrun: `torchrun --nproc-per-node 1 -m irank score` and `refine --scope full` on the GPU (nccl), with the
  table compared to the one-process run's.

Each `score` run also records where its time went: the start and length of every progress task
(the forward pass, the choice sample's layers, the rest of the rows, writing the table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from cifar_data import CLASSES, make_manifests
from posttrain_cifar import (
    DATA,
    ROOT,
    detection,
    plain_inference_seconds,
    plain_training_seconds,
    scores_in_row_order,
    synchronize,
    truth_mask,
)

import irank
from irank.options import BoundaryOptions, ModelOptions, RunOptions
from irank.runtime.progress import Reporter

# the CIFAR benchmark's helpers (posttrain_cifar, cifar_data) live in benchmarks/cifar/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cifar"))

BASE = ROOT / "bench-out" / "base"


class PhaseReporter(Reporter):
    """Records each progress task's start (seconds from the reporter's creation) and length, and each message."""

    def __init__(self):
        self.origin = time.perf_counter()
        self.events: list[dict] = []

    @contextlib.contextmanager
    def task(self, description, total):
        started = time.perf_counter()
        yield lambda advance=1: None
        synchronize()
        self.events.append({"task": description, "at": round(started - self.origin, 3),
                            "seconds": round(time.perf_counter() - started, 3)})

    def info(self, message):
        self.events.append({"info": message[:120], "at": round(time.perf_counter() - self.origin, 3)})


def timed_score(checkpoint: str, manifest: str, run: RunOptions, model_options: ModelOptions, boundary: str,
                folder: Path) -> tuple[float, dict]:
    reporter = PhaseReporter()
    output = folder / f"scores-{boundary}.csv"
    synchronize()
    started = time.perf_counter()
    result = irank.score(checkpoint, manifest, output=str(output), boundary=BoundaryOptions(kind=boundary),
                         model_options=model_options, run_options=run, reporter=reporter, overwrite=True)
    seconds = time.perf_counter() - started
    parameters = result.sidecar["parameters"]
    return seconds, {"phases": reporter.events, "layer": parameters.get("layer"),
                     "placement": {k: parameters.get(k) for k in ("device", "channels_last", "precision")}}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def compare_passes(checkpoint: str, manifest: str, run: RunOptions, model_options: ModelOptions, repeats: int,
                   folder: Path) -> dict:
    times: dict[str, list[float]] = {"plain": [], "plain_placed": [], "score_head": [], "score_refit": []}
    details = {}
    plain_inference_seconds(checkpoint, manifest, True, run, model_options)  # warm-up: cuDNN, page cache, workers
    for _ in range(repeats):
        times["plain"].append(plain_inference_seconds(checkpoint, manifest, False, run, model_options))
        times["plain_placed"].append(plain_inference_seconds(checkpoint, manifest, True, run, model_options))
        for boundary in ("head", "refit"):
            seconds, details[boundary] = timed_score(checkpoint, manifest, run, model_options, boundary, folder)
            times[f"score_{boundary}"].append(seconds)
    medians = {name: median(values) for name, values in times.items()}
    ratios = {f"{score}/{plain}": medians[score] / medians[plain]
              for score in ("score_head", "score_refit") for plain in ("plain", "plain_placed")}
    return {"times": times, "medians": medians, "ratios": ratios, "details": details,
            "rows": len(pd.read_csv(manifest)), "batch_size": run.batch_size}


def compare_training(checkpoint: str, manifest: str, run: RunOptions, model_options: ModelOptions,
                     options: irank.TrainOptions, folder: Path) -> dict:
    plain = plain_training_seconds(checkpoint, manifest, options, False, run, model_options)
    placed = plain_training_seconds(checkpoint, manifest, options, True, run, model_options)
    synchronize()
    started = time.perf_counter()
    irank.refine(checkpoint, manifest, output=str(folder / "refined.safetensors"), train_options=options,
                 model_options=model_options, run_options=run, overwrite=True)
    refine = time.perf_counter() - started
    return {"epochs": options.epochs, "plain": plain, "plain_placed": placed, "refine": refine,
            "ratios": {"refine/plain": refine / plain, "refine/plain_placed": refine / placed}}


def small_base(manifests: dict) -> str:
    checkpoint = BASE / "ce-sym40.safetensors"
    if not checkpoint.exists():  # as benchmarks/cifar/train_bases.sh trains it
        BASE.mkdir(parents=True, exist_ok=True)
        irank.train("small-cnn", str(manifests["sym40"]), output=str(checkpoint),
                    train_options=irank.TrainOptions(epochs=30, lr=0.05, seed=0),
                    model_options=ModelOptions(preprocess="cifar10"),
                    run_options=RunOptions(device="auto", batch_size=128))
    return str(checkpoint)


def big_base(manifests: dict, folder: Path, rows: int = 1024) -> str:
    checkpoint = folder / "resnet50-224.safetensors"
    if not checkpoint.exists():
        subset = DATA / "train-sym40-base.csv"
        pd.read_csv(manifests["sym40"]).head(rows).to_csv(subset, index=False)
        irank.train("resnet50", str(subset), output=str(checkpoint), train_options=irank.TrainOptions(epochs=1, seed=0),
                    model_options=ModelOptions(preprocess="imagenet"), run_options=RunOptions(device="auto", batch_size=128))
    return str(checkpoint)


def all_images_manifest() -> str:
    path = DATA / "train-all.csv"
    if not path.exists():
        rows = [(f"train/{name}/{file.name}", name) for name in CLASSES for file in sorted((DATA / "train" / name).glob("*.jpg"))]
        pd.DataFrame(rows, columns=["path", "label"]).to_csv(path, index=False)
    return str(path)


def agreement(checkpoint: str, manifest: str, folder: Path) -> dict:
    corrupted = truth_mask(manifest)
    out = {}
    for boundary in ("head", "refit"):
        scores = {}
        for name, device, precision in (("cpu", "cpu", "fp32"), ("gpu_fp32", "auto", "fp32"), ("gpu_auto", "auto", "auto")):
            run = RunOptions(device=device, batch_size=256, precision=precision)
            output = folder / f"agree-{boundary}-{name}.csv"
            started = time.perf_counter()
            irank.score(checkpoint, manifest, output=str(output), boundary=BoundaryOptions(kind=boundary), run_options=run,
                        overwrite=True)
            scores[name] = scores_in_row_order(output, manifest)
            out[f"{boundary}/{name}"] = {"seconds": time.perf_counter() - started,
                                         **detection(scores[name], corrupted)}
        for name in ("gpu_fp32", "gpu_auto"):
            difference = np.abs(scores[name] - scores["cpu"])
            k = int(corrupted.sum())

            def top(values, k=k):
                return set(np.argsort(-values, kind="stable")[:k].tolist())

            out[f"{boundary}/{name}"].update({
                "max_abs_difference_from_cpu": float(difference.max()),
                "spearman_with_cpu": float(pd.Series(scores[name]).rank().corr(pd.Series(scores["cpu"]).rank())),
                "top_k_overlap_with_cpu": len(top(scores[name]) & top(scores["cpu"])) / k,
            })
    return out


def torchrun_check(checkpoint: str, manifest: str, folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "irank"]
    out = {}
    commands = {
        "score": ["score", checkpoint, manifest, "-o", str(folder / "torchrun-scores.csv"), "--overwrite", "-q"],
        "refine": ["refine", checkpoint, manifest, "-o", str(folder / "torchrun-refined.safetensors"), "--scope", "full",
                   "--epochs", "1", "--overwrite", "-q"],
    }
    for name, command in commands.items():
        started = time.perf_counter()
        done = subprocess.run(base + command, env=env, capture_output=True, text=True)
        out[name] = {"returncode": done.returncode, "seconds": time.perf_counter() - started,
                     "stderr_tail": done.stderr[-1500:]}
    if out["score"]["returncode"] == 0:
        single = folder / "single-scores.csv"
        irank.score(checkpoint, manifest, output=str(single), run_options=RunOptions(device="auto"), overwrite=True)
        a, b = pd.read_csv(single), pd.read_csv(folder / "torchrun-scores.csv")
        out["score"]["same_ids_in_rank_order"] = bool((a["id"] == b["id"]).all())
        out["score"]["max_abs_score_difference"] = float(np.abs(a.set_index("id")["score"] - b.set_index("id")["score"]).max())
    return out


def probe_fits() -> dict:
    """The refit boundary's fits, which `score` runs on the CPU, timed on the CPU and on the CUDA device on
    features of the benchmark's shapes (Gaussian classes, 40% of labels flipped): the final float64 fit on
    50,000 × 512 rows, and the layer choice on 4,096 rows of small-cnn's and resnet50's candidate layers."""
    from irank.core.layer_choice import choose_layer
    from irank.core.linear import fit_with_scaling

    generator = torch.Generator().manual_seed(0)

    def features(rows: int, width: int, truth: torch.Tensor) -> torch.Tensor:
        centres = torch.randn(10, width, generator=generator)
        return centres[truth] + 2 * torch.randn(rows, width, generator=generator)

    def noisy(truth: torch.Tensor) -> torch.Tensor:
        labels = truth.clone()
        flip = torch.rand(len(truth), generator=generator) < 0.4
        labels[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=generator)
        return labels

    out = {}
    devices = (("cpu", None),) + ((("cuda", torch.device("cuda")),) if torch.cuda.is_available() else ())
    truth = torch.randint(0, 10, (50_000,), generator=generator)
    rows, labels = features(50_000, 512, truth), noisy(truth)
    fits = {}
    for name, device in devices:
        synchronize()
        started = time.perf_counter()
        fits[name] = fit_with_scaling(rows, labels, 10, l2=0.1, device=device)
        out[f"final_fit_50000x512/{name}_seconds"] = time.perf_counter() - started
    if "cuda" in fits:
        out["final_fit_50000x512/largest_weight_difference"] = float((fits["cpu"][0] - fits["cuda"][0]).abs().max())
    for model, widths in (("small-cnn", (64, 128, 256, 512, 256)), ("resnet50", (2048, 4096, 4096, 4096, 2048))):
        truth = torch.randint(0, 10, (4096,), generator=generator)
        candidates = {f"layer{i}": features(4096, width, truth) for i, width in enumerate(widths)}
        labels = noisy(truth)
        choices = {}
        for name, device in devices:
            synchronize()
            started = time.perf_counter()
            choices[name] = choose_layer(candidates, labels, 10, l2=0.1, device=device)
            out[f"choice_{model}/{name}_seconds"] = time.perf_counter() - started
        if "cuda" in choices:
            out[f"choice_{model}/same_layer"] = choices["cpu"].layer == choices["cuda"].layer
    return out


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(), "irank": irank.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=str(ROOT / "bench-out" / "gpu_cost.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="small,refine,fits,big,agree,torchrun")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which no section starts")
    parser.add_argument("--small-manifest", default=None, help="instead of all 50,000 training images (a quick try)")
    parser.add_argument("--big-rows", type=int, default=10000, help="rows of the 10,000-image subset for big (a quick try: fewer)")
    args = parser.parse_args()
    started = time.perf_counter()
    results = {"environment": environment(), "command": " ".join(sys.argv)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, value) -> None:
        results[name] = value
        results["elapsed_seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(results, indent=2, default=str))
        print(f"[{name}] {time.perf_counter() - started:.0f} s: {json.dumps(value, default=str)[:3000]}", flush=True)

    save("environment", results["environment"])
    manifests = make_manifests(ROOT / "bench-data")
    everything = args.small_manifest or all_images_manifest()
    big_manifest = str(manifests["sym40"])
    if args.big_rows < 10000:
        big_manifest = str(DATA / f"train-sym40-{args.big_rows}.csv")
        pd.read_csv(manifests["sym40"]).head(args.big_rows).to_csv(big_manifest, index=False)
    run = RunOptions(device="auto", batch_size=256)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for section in args.sections.split(","):
            if time.perf_counter() - started > args.deadline:
                save(section, "skipped: past --deadline")
                continue
            begun = time.perf_counter()
            try:
                if section == "small":
                    value = compare_passes(small_base(manifests), everything, run, ModelOptions(), args.repeats, folder)
                elif section == "big":
                    value = compare_passes(big_base(manifests, folder, min(1024, args.big_rows)), big_manifest, run, ModelOptions(),
                                           max(1, args.repeats - 1), folder)
                elif section == "refine":
                    value = {"small-cnn": compare_training(small_base(manifests), everything, run, ModelOptions(),
                                                           irank.TrainOptions(scope="full", epochs=2, lr=0.01, seed=0), folder)}
                    if "big" in args.sections:
                        value["resnet50-224"] = compare_training(big_base(manifests, folder, min(1024, args.big_rows)), big_manifest, run,
                                                                 ModelOptions(),
                                                                 irank.TrainOptions(scope="full", epochs=1, lr=0.01, seed=0),
                                                                 folder)
                elif section == "agree":
                    value = agreement(small_base(manifests), str(manifests["sym40"]), folder)
                elif section == "fits":
                    value = probe_fits()
                elif section == "torchrun":
                    value = torchrun_check(small_base(manifests), str(manifests["sym40"]), folder)
                else:
                    raise SystemExit(f"unknown section {section}")
            except Exception as error:  # a section that fails must not lose the others' results
                import traceback
                value = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
            if isinstance(value, dict):
                value["section_seconds"] = time.perf_counter() - begun
                if torch.cuda.is_available():
                    value["max_gpu_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            save(section, value)
    print(summary(results), flush=True)


def summary(results: dict) -> str:
    lines = []
    for section in ("small", "big"):
        value = results.get(section)
        if isinstance(value, dict) and "medians" in value:
            m = value["medians"]
            lines.append(f"{section} ({value['rows']} rows): plain {m['plain']:.2f} s, plain placed {m['plain_placed']:.2f} s, "
                         f"score head {m['score_head']:.2f} s, score default {m['score_refit']:.2f} s; "
                         + ", ".join(f"{k} {v:.2f}" for k, v in value["ratios"].items()))
    value = results.get("refine")
    if isinstance(value, dict):
        for name, entry in value.items():
            if isinstance(entry, dict) and "ratios" in entry:
                lines.append(f"refine {name} {entry['epochs']} epochs: plain {entry['plain']:.2f} s, placed "
                             f"{entry['plain_placed']:.2f} s, refine {entry['refine']:.2f} s; "
                             + ", ".join(f"{k} {v:.2f}" for k, v in entry["ratios"].items()))
    value = results.get("agree")
    if isinstance(value, dict):
        for name, entry in value.items():
            if isinstance(entry, dict) and "auroc" in entry:
                lines.append(f"agree {name}: auroc {entry['auroc']:.4f} p@k {entry['precision_at_k']:.4f} "
                             f"{entry['seconds']:.1f} s" + (f", spearman {entry['spearman_with_cpu']:.5f}, top-k "
                                                             f"overlap {entry['top_k_overlap_with_cpu']:.4f}, max diff "
                                                             f"{entry['max_abs_difference_from_cpu']:.2e}"
                                                             if "spearman_with_cpu" in entry else ""))
    value = results.get("fits")
    if isinstance(value, dict) and "error" not in value:
        lines.append("fits: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()
                                          if k != "max_gpu_memory_allocated_mib"))
    value = results.get("torchrun")
    if isinstance(value, dict):
        for name in ("score", "refine"):
            if isinstance(value.get(name), dict):
                entry = value[name]
                lines.append(f"torchrun {name}: rc {entry['returncode']} {entry['seconds']:.1f} s "
                             + " ".join(f"{k} {entry[k]}" for k in ("same_ids_in_rank_order", "max_abs_score_difference")
                                        if k in entry))
    for section, value in results.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"{section}: FAILED {value['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
