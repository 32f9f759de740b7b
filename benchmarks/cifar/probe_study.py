"""Which decision boundary finds mislabeled samples best? A study on cached layer features (not run by CI).

    python benchmarks/cifar/probe_study.py SETTING [--layers features.1,features.2,...] [--l2 1e-3,1e-2]

For each layer of the base checkpoint bench-out/base/SETTING.safetensors: pooled features of the
training subset and the test set (cached in bench-out/SETTING/layers/), then for each L2 strength an
L2-regularized linear probe: detection (AUROC, precision at k) of its loss / margin / influence,
k-fold held-out loss on the given labels (the label-free layer choice), test accuracy, and the
gradual loop on the probe (refit, remove the top step, repeat). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from irank.core.metrics import auroc, precision_at_k
from irank.core.probe import heldout_probe_loss, probe_logits, probe_scores
from irank.model.inputs import make_loader
from irank.model.layers import layer_features
from irank.model.prepare import prepare
from irank.options import ModelOptions

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "bench-data" / "cifar10"


def cached_features(checkpoint: str, manifest: str, layers: list[str], cache: Path) -> tuple[dict, torch.Tensor]:
    """Pooled features of all `layers` from one pass, cached per (manifest, layer)."""
    paths = {layer: cache / f"{Path(manifest).stem}-{layer}.pt" for layer in layers}
    if not all(path.exists() for path in paths.values()):
        prepared = prepare(checkpoint, manifest, ModelOptions())
        loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=256, num_workers=2)
        features = layer_features(prepared.model, layers, loader, num_rows=len(prepared.labels), device=torch.device("cpu"))
        labels = torch.from_numpy(prepared.labels)
        cache.mkdir(parents=True, exist_ok=True)
        for layer in layers:
            torch.save({"features": features[layer], "labels": labels}, paths[layer])
    loaded = {layer: torch.load(path) for layer, path in paths.items()}
    return {layer: item["features"] for layer, item in loaded.items()}, next(iter(loaded.values()))["labels"]


def detection(scores: np.ndarray, corrupted: np.ndarray) -> tuple[float, float]:
    return auroc(scores, corrupted), precision_at_k(np.argsort(-scores, kind="stable"), corrupted)


def knn_disagreement(features: torch.Tensor, labels: torch.Tensor, k: int = 20) -> torch.Tensor:
    """Share of a sample's k nearest neighbours (cosine, standardized features) whose label differs."""
    z = (features - features.mean(0)) / features.std(0).clamp_min(1e-6)
    z = torch.nn.functional.normalize(z, dim=1)
    scores = torch.empty(len(z))
    for start in range(0, len(z), 1024):
        similarity = z[start : start + 1024] @ z.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -2
        neighbours = similarity.topk(k, dim=1).indices
        scores[start : start + 1024] = (labels[neighbours] != labels[start : start + 1024, None]).float().mean(1)
    return scores


def gradual(features, labels, corrupted, l2, rounds, step, measure="loss"):
    n = len(labels)
    kept = np.ones(n, dtype=bool)
    order = []
    per_round = int(round(step * n))
    for _ in range(rounds):
        rows = np.flatnonzero(kept)
        scores, _, _ = probe_scores(features[rows], labels[rows], int(labels.max()) + 1, l2=l2, measure=measure)
        top = rows[np.argsort(-scores.numpy(), kind="stable")[:per_round]]
        order.extend(top.tolist())
        kept[top] = False
    removed = np.array(order)
    return float(corrupted[removed].mean()), kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("setting")
    parser.add_argument("--layers", default="features.1,features.2,features.3,flatten")
    parser.add_argument("--l2", default="1e-3,1e-2,1e-1")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    checkpoint = str(ROOT / "bench-out" / "base" / f"{args.setting}.safetensors")
    manifest = str(DATA / f"train-{args.setting.split('-')[1]}.csv")
    table = pd.read_csv(manifest)
    corrupted = (table["label"] != table["true_label"]).to_numpy()
    budget = corrupted.mean()
    cache = ROOT / "bench-out" / args.setting / "layers"
    rows = []
    layers = args.layers.split(",")
    all_features, labels = cached_features(checkpoint, manifest, layers, cache)
    all_test_features, test_labels = cached_features(checkpoint, str(DATA / "test.csv"), layers, cache)
    for layer in layers:
        features, test_features = all_features[layer], all_test_features[layer]
        knn = knn_disagreement(features, labels).numpy()
        rows.append({"layer": layer, "dims": features.shape[1], "l2": "-", "measure": "knn-20",
                     **dict(zip(("auroc", "p@k"), detection(knn, corrupted)))})
        for l2 in map(float, args.l2.split(",")):
            started = time.perf_counter()
            heldout = heldout_probe_loss(features, labels, 10, l2=l2)
            for measure in ("loss", "margin", "self-influence"):
                scores, logits, (weight, bias) = probe_scores(features, labels, 10, l2=l2, measure=measure)
                row = {"layer": layer, "dims": features.shape[1], "l2": l2, "measure": measure,
                       **dict(zip(("auroc", "p@k"), detection(scores.numpy(), corrupted))), "heldout_loss": heldout}
                if measure == "loss":
                    test_logits = probe_logits(test_features, weight, bias)
                    row["probe_test_acc"] = float((test_logits.argmax(1) == test_labels).float().mean())
                    loss_rank = scores.numpy()
                    row["loss+knn auroc"] = auroc(np.argsort(np.argsort(loss_rank)) + np.argsort(np.argsort(knn)), corrupted)
                    if budget > 0:
                        precision, kept = gradual(features, labels, corrupted, l2, args.rounds, budget / args.rounds)
                        row["gradual p@k"] = precision
                        weight2, bias2 = probe_scores(features[kept], labels[kept], 10, l2=l2)[2]
                        row["gradual probe test acc"] = float((probe_logits(test_features, weight2, bias2).argmax(1) == test_labels).float().mean())
                rows.append(row)
            print(f"{layer} l2={l2}: {time.perf_counter() - started:.0f} s", flush=True)
    result = pd.DataFrame(rows)
    out = ROOT / "bench-out" / args.setting / "probe_study.csv"
    result.to_csv(out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(result.to_string(index=False))


if __name__ == "__main__":
    main()
