"""What every script of the benchmark suite shares: where outputs live, the class names, the metrics.

Outputs (images, manifests, checkpoints, scores, results) live outside git, under $IRANK_BENCH
(default /work/bench), so that several worktrees share one set of bases:
  data/cifar10/     the unpacked images and the manifests (benchmarks/data.py)
  bases/NAME.*      each base checkpoint and its facts (benchmarks/bases.py)
  outputs/NAME/     per-sample outputs of the peers (scores, cross-validated probabilities, margins)
  results/NAME.json each ranking's measures on the base (benchmarks/peers.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

BENCH = Path(os.environ.get("IRANK_BENCH", "/work/bench"))
DATA = BENCH / "data" / "cifar10"
BASES = BENCH / "bases"
OUTPUTS = BENCH / "outputs"
RESULTS = BENCH / "results"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# irank's `--preprocess cifar10` preset, as Preprocess.to_dict() writes it into a checkpoint's metadata
PREPROCESS = {"image_size": 32, "resize": None, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def threads() -> int:
    """Torch threads for the suite's own loops: 1 by default, so that the machine's other core stays free
    (on 2 shared cores one thread ran an epoch 2.6× faster than two threads contending with other work)."""
    return int(os.environ.get("BENCH_THREADS", "1"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, values: dict) -> None:
    """Write atomically (a killed run never leaves half a file that a restart would trust)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def auroc(scores: np.ndarray, wrong: np.ndarray) -> float | None:
    """Probability that a wrong label scores above a right one (ties count half): Mann–Whitney U."""
    wrong = np.asarray(wrong, bool)
    positives, negatives = int(wrong.sum()), int((~wrong).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = pd.Series(np.asarray(scores, float)).rank(method="average").to_numpy()
    return float((ranks[wrong].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def precision_at_k(scores: np.ndarray, wrong: np.ndarray) -> float | None:
    """Share of wrong labels among the k highest scores, k = the number of wrong labels (ties: lower row first)."""
    wrong = np.asarray(wrong, bool)
    k = int(wrong.sum())
    if k == 0:
        return None
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, float)))
    return float(wrong[order[:k]].mean())


def detection(scores: np.ndarray, wrong: np.ndarray) -> dict:
    """The two detection measures of the suite for one ranking (higher score = more suspect)."""
    return {"auroc": auroc(scores, wrong), "precision_at_k": precision_at_k(scores, wrong)}
