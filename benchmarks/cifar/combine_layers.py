"""Does ranking by the probe losses of two layers together beat the layer `--layer auto` chooses? One-shot
on the CIFAR-10 base checkpoints (not run by CI).

    python benchmarks/cifar/combine_layers.py [CHECKPOINT ...]   # default: every noisy base that is trained

For each base: every candidate layer's features on all 10,000 training rows (cached in
bench-out/combine-cache/), the layer choice, each layer's probe loss (L2 0.1), and three combinations,
each the mean of the layers' loss ranks: the two best non-memorized layers by held-out loss, every
non-memorized layer, and the chosen layer with the block before it. AUROC / precision at k against the
known wrong labels; bench-out/combine-study.json holds everything.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from posttrain_cifar import ROOT, RUN, base_paths, detection, truth_mask

from irank.core.layer_choice import choose_layer
from irank.core.probe import refit_scores
from irank.model.inputs import make_loader
from irank.model.layers import block_candidates, layer_features
from irank.model.placement import placement_for
from irank.model.prepare import prepare
from irank.options import ModelOptions

BASES = ["ce-sym20", "ce-sym40", "ce-sym60", "ce-asym20", "ce-asym40", "gce-sym20", "gce-sym40", "ce-sym40-es",
         "ce-sym40-aug"]


def rank_share(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks / len(values)


def cell(figures: dict) -> str:
    return f"{figures['auroc']:.3f} / {figures['precision_at_k']:.3f}"


def main() -> None:
    names = sys.argv[1:] or [n for n in BASES if (ROOT / "bench-out" / "base" / f"{n}.safetensors").exists()]
    cache = ROOT / "bench-out" / "combine-cache"
    cache.mkdir(parents=True, exist_ok=True)
    results = {}
    print("| checkpoint | chosen layer alone | two best by held-out loss | every non-memorized layer | chosen + the block before |")
    print("|---|---|---|---|---|")
    for name in names:
        checkpoint, manifest = base_paths(name)
        corrupted = truth_mask(manifest)
        prepared = prepare(checkpoint, manifest, ModelOptions())
        labels = torch.from_numpy(prepared.labels)
        cached = cache / f"{name}.pt"
        if cached.exists():
            features = torch.load(cached)
        else:
            loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=256, num_workers=2)
            features = layer_features(prepared.model, block_candidates(prepared.model, prepared.head_name), loader,
                                      num_rows=len(labels), device=placement_for(RUN, prepared.model))
            torch.save(features, cached)
        choice = choose_layer(features, labels, len(prepared.classes), l2=0.1)
        losses = {layer: refit_scores(values, labels, len(prepared.classes), method="loss", measure="self-influence",
                                      l2=0.1)[0].numpy() for layer, values in features.items()}
        figures = choice.figures
        usable = [layer for layer in figures if not figures[layer]["memorized"]] or list(figures)
        by_heldout = sorted(usable, key=lambda layer: figures[layer]["heldout_loss"] or float("inf"))
        order = list(features)
        at = order.index(choice.layer)
        combos = {"best2_by_heldout": by_heldout[:2], "all_nonmemorized": usable,
                  "chosen_and_previous": order[max(at - 1, 0): at + 1]}
        record = {"chosen": choice.layer, "per_layer": {layer: detection(losses[layer], corrupted) for layer in losses},
                  "figures": {layer: {key: figures[layer][key] for key in ("agreement", "memorized", "heldout_loss")}
                              for layer in figures}}
        for combo, layers in combos.items():
            record[combo] = {"layers": layers,
                             **detection(sum(rank_share(losses[layer]) for layer in layers), corrupted)}
        results[name] = record
        print(f"| `{name}` | `{choice.layer}` {cell(record['per_layer'][choice.layer])} | "
              + " | ".join(f"{', '.join(f'`{layer}`' for layer in record[c]['layers'])}: {cell(record[c])}" for c in combos)
              + " |", flush=True)
        (ROOT / "bench-out" / "combine-study.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
