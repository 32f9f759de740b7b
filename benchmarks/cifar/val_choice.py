"""`--layer auto` by held-out loss on the given labels against `--val` (clean accuracy), on the CIFAR-10
base checkpoints (not run by CI).

    python benchmarks/cifar/val_choice.py [SETTING ...]     # default: ce-sym20 ce-sym40 ce-asym40 gce-sym40

For each setting and each method (the probe's loss, its self-influence), scores the training subset twice,
one-shot, and prints the chosen layer with AUROC / precision at k against the known wrong labels.
Writes bench-out/val-choice.json.
"""

from __future__ import annotations

import json
import sys

from posttrain_cifar import DATA, ROOT, RUN, base_paths, detection, truth_mask

import irank
from irank.formats.manifest import read_manifest
from irank.options import BoundaryOptions

settings = sys.argv[1:] or ["ce-sym20", "ce-sym40", "ce-asym40", "gce-sym40"]
results = {}
for setting in settings:
    checkpoint, manifest = base_paths(setting)
    corrupted = truth_mask(manifest)
    for method in ("loss", "influence"):
        for how, val in (("held-out loss", None), ("--val", str(DATA / "val.csv"))):
            result = irank.score(checkpoint, manifest, method=method, run_options=RUN,
                                 boundary=BoundaryOptions(kind="refit", layer="auto", val=val))
            table = result.table.set_index("id").loc[read_manifest(manifest).ids]  # manifest order
            figures = detection(table["score"].to_numpy(), corrupted)
            parameters = result.sidecar["parameters"]
            record = {"layer": parameters["layer"], **figures,
                      "val_accuracy": {k: v.get("val_accuracy") for k, v in parameters["layers"].items()}}
            results[f"{setting} {method} {how}"] = record
            print(f"{setting:10s} {method:9s} {how:13s} layer {record['layer']:11s} AUROC {figures['auroc']:.3f} "
                  f"p@k {figures['precision_at_k']:.3f}", flush=True)
(ROOT / "bench-out" / "val-choice.json").write_text(json.dumps(results, indent=2))
