"""Which score ranks wrong labels best on the refit probe: its loss (what `--method auto` uses there) or its
influence? One-shot on CIFAR-10 base checkpoints (not run by CI).

    python benchmarks/cifar/method_auto.py [CHECKPOINT ...]
    # default: the benchmark's five bases and, when trained (EXTRA=1 bash benchmarks/cifar/train_bases.sh),
    # ce-sym60 ce-asym20 gce-sym20 ce-sym40-es ce-sym40-aug

For each base checkpoint bench-out/base/NAME.safetensors (NAME = LOSS-SETTING[-VARIANT], scored on
bench-data/cifar10/train-SETTING.csv): `score` with the default boundary (refit, --layer auto) and each of
--method loss, influence and auto; prints the checkpoint's accuracy on the given labels (how much of them
it memorized), the chosen layer, AUROC / precision at k against the known wrong labels, and what auto
chose. Writes bench-out/method-auto.json (adding to what earlier runs wrote).
"""

from __future__ import annotations

import json
import sys

from posttrain_cifar import ROOT, RUN, base_paths, detection, truth_mask

import irank
from irank.formats.manifest import read_manifest

BASES = ["ce-sym20", "ce-sym40", "ce-asym40", "gce-sym40", "ce-sym0"]
EXTRA = ["ce-sym60", "ce-asym20", "gce-sym20", "ce-sym40-es", "ce-sym40-aug"]


def main() -> None:
    names = sys.argv[1:] or BASES + [n for n in EXTRA if (ROOT / "bench-out" / "base" / f"{n}.safetensors").exists()]
    path = ROOT / "bench-out" / "method-auto.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # earlier runs' checkpoints are kept
    print("| checkpoint | head's fit to the given labels | layer | probe loss | probe influence | auto picks |")
    print("|---|---|---|---|---|---|")
    for name in names:
        checkpoint, manifest = base_paths(name)
        corrupted = truth_mask(manifest)
        record = {}
        for method in ("auto", "loss", "influence"):
            result = irank.score(checkpoint, manifest, method=method, run_options=RUN)
            table = result.table.set_index("id").loc[read_manifest(manifest).ids]  # manifest order
            figures = detection(table["score"].to_numpy(), corrupted) if corrupted.any() else {}
            record[method] = {"method": result.sidecar["method"], "layer": result.sidecar["parameters"]["layer"], **figures}
        record["head_label_fit"] = irank.evaluate(checkpoint, manifest, run_options=RUN)["accuracy"]
        results[name] = record

        def cell(method: str) -> str:
            entry = record[method]
            return f"{entry['auroc']:.3f} / {entry['precision_at_k']:.3f}" if "auroc" in entry else "(no wrong labels)"

        print(f"| `{name}` | {record['head_label_fit']:.1%} | `{record['auto']['layer']}` | {cell('loss')} | "
              f"{cell('influence')} | {record['auto']['method']} |", flush=True)
        path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
