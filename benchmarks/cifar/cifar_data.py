"""CIFAR-10 subsets with seeded label noise for the benchmarks (not run by CI).

Unpacks ../shared/data/cifar10/*.tar.gz into bench-data/cifar10 (git-ignored) on first use and writes
manifests with the given `label` and the clean `true_label`:
  train-<noise>.csv  the training subset (default 1,000 per class) with noise applied
  val.csv            a small clean validation set (default 100 per class), disjoint from train
  test.csv           the 10,000 test images
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
# the archives: ../shared/data/cifar10, or where IRANK_CIFAR_ARCHIVES points (a lent GPU machine has no ../shared)
SHARED = Path(os.environ.get("IRANK_CIFAR_ARCHIVES") or ROOT.parent / "shared" / "data" / "cifar10")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Pair flips of the noisy-label literature: truck→automobile, bird→airplane, deer→horse, cat↔dog.
PAIRS = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}
# The benchmark's settings, then those of the extra checkpoints that check the default --method auto.
# Each setting's noise has its own seeded generator: adding one leaves the others' files unchanged.
SETTINGS = ("sym0", "sym20", "sym40", "asym40", "sym60", "asym20")


def unpack(data_dir: Path) -> Path:
    target = data_dir / "cifar10"
    for split in ("train", "test"):
        if not (target / split).is_dir():
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(SHARED / f"{split}.tar.gz") as archive:
                archive.extractall(target, filter="data")
    return target


def corrupt(truth: np.ndarray, kind: str, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric: a `rate` share moved to a uniformly chosen other class. Asymmetric: `rate` of each
    source class of PAIRS flipped to its pair (the other classes stay clean)."""
    labels = truth.copy()
    if rate == 0:
        return labels
    if kind == "sym":
        chosen = rng.choice(len(truth), size=int(round(rate * len(truth))), replace=False)
        labels[chosen] = (truth[chosen] + rng.integers(1, len(CLASSES), len(chosen))) % len(CLASSES)
        return labels
    for source, target in PAIRS.items():
        members = np.flatnonzero(truth == CLASSES.index(source))
        chosen = rng.choice(members, size=int(round(rate * len(members))), replace=False)
        labels[chosen] = CLASSES.index(target)
    return labels


def make_manifests(data_dir: Path, *, per_class: int = 1000, val_per_class: int = 100, seed: int = 0,
                   settings: tuple[str, ...] = SETTINGS) -> dict[str, Path]:
    root = unpack(data_dir)
    rng = np.random.default_rng(seed)
    rows, val_rows = [], []
    for index, name in enumerate(CLASSES):
        files = sorted((root / "train" / name).glob("*.jpg"))
        picked = rng.permutation(len(files))[: per_class + val_per_class]
        rows += [(f"train/{name}/{files[i].name}", index) for i in picked[:per_class]]
        val_rows += [(f"train/{name}/{files[i].name}", index) for i in picked[per_class:]]
    order = rng.permutation(len(rows))
    paths = np.array([rows[i][0] for i in order])
    truth = np.array([rows[i][1] for i in order])
    out = {}
    for setting in settings:
        kind, rate = ("asym", setting[4:]) if setting.startswith("asym") else ("sym", setting[3:])
        noisy = corrupt(truth, kind, int(rate) / 100, np.random.default_rng(seed + 1))
        table = pd.DataFrame({"path": paths, "label": np.array(CLASSES)[noisy], "true_label": np.array(CLASSES)[truth]})
        out[setting] = root / f"train-{setting}.csv"
        table.to_csv(out[setting], index=False)
    pd.DataFrame({"path": [p for p, _ in val_rows], "label": [CLASSES[c] for _, c in val_rows]}).to_csv(root / "val.csv", index=False)
    test = [(f"test/{name}/{f.name}", name) for name in CLASSES for f in sorted((root / "test" / name).glob("*.jpg"))]
    pd.DataFrame(test, columns=["path", "label"]).to_csv(root / "test.csv", index=False)
    out["val"], out["test"] = root / "val.csv", root / "test.csv"
    return out


if __name__ == "__main__":
    for name, path in make_manifests(ROOT / "bench-data").items():
        print(name, path)
