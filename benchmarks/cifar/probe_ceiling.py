"""How well could ANY linear probe on a checkpoint's features rank its wrong labels? A probe fitted on exactly
the clean rows (an oracle: it knows which labels are wrong), at each candidate layer and on all layers
together, scored by its loss on the given labels. Not run by CI; needs the features that
benchmarks/cifar/combine_layers.py caches in bench-out/combine-cache/.

    python benchmarks/cifar/probe_ceiling.py [CHECKPOINT ...]   # default: ce-sym40 ce-sym20 ce-sym40-es ce-sym40-aug
"""

from __future__ import annotations

import sys

import pandas as pd
import torch
import torch.nn.functional as F
from posttrain_cifar import ROOT, base_paths, detection, truth_mask

from irank.core.linear import fit_standardized, standardize


def main() -> None:
    for name in sys.argv[1:] or ["ce-sym40", "ce-sym20", "ce-sym40-es", "ce-sym40-aug"]:
        features = torch.load(ROOT / "bench-out" / "combine-cache" / f"{name}.pt")
        manifest = base_paths(name)[1]
        table = pd.read_csv(manifest)
        classes = sorted(table["label"].unique())
        labels = torch.tensor(pd.Categorical(table["label"], categories=classes).codes, dtype=torch.long)
        corrupted = truth_mask(manifest)
        clean = torch.from_numpy(~corrupted)
        candidates = {layer: standardize(values.double()) for layer, values in features.items()}
        candidates["all layers"] = torch.cat(list(candidates.values()), 1)
        for layer, values in candidates.items():
            cells = []
            for l2 in (0.003, 0.01, 0.1):
                weight, bias = fit_standardized(values[clean], labels[clean], len(classes), l2=l2)
                loss = F.cross_entropy(values @ weight.T + bias, labels, reduction="none").numpy()
                figures = detection(loss, corrupted)
                cells.append(f"L2 {l2}: {figures['auroc']:.3f} / {figures['precision_at_k']:.3f}")
            print(f"| `{name}` | `{layer}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
