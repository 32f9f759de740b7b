"""Markdown tables from bench-out/<setting>/results.json (written by posttrain_cifar.py).

    python tests/bench/report.py ce-sym40 ce-sym20 ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def report(setting: str) -> str:
    results = json.loads((ROOT / "bench-out" / setting / "results.json").read_text())
    lines = [f"### {setting}: {results['corrupted']} corrupted labels of 10,000; base checkpoint fits "
             f"{results['base_train_fit']:.1%} of the given labels, test accuracy {results['base_test_accuracy']:.3f}", ""]
    one_shot = results.get("one_shot", {})
    if results["corrupted"]:
        lines += ["| ranking | AUROC | precision at k |", "|---|---|---|"]
        for name, row in one_shot.get("rankings", {}).items():
            extra = f" (flags {row['flagged']}: precision {fmt(row['flagged_precision'])}, recall {fmt(row['flagged_recall'])})" if "flagged" in row else ""
            lines.append(f"| {name}, one-shot{extra} | {fmt(row['auroc'])} | {fmt(row['precision_at_k'])} |")
        for key, value in results.items():
            if key.startswith("post_") and not key.endswith("_seconds") and "gradual" in value:
                layer = f", layer {value['layer']}" if value.get("layer") else ""
                lines.append(f"| post-train {key[5:]}{layer}, gradual | {fmt(value['gradual']['auroc'])} | {fmt(value['gradual']['precision_at_k'])} |")
        lines.append("")
    lines += ["| refinement | test accuracy | recovery ratio |", "|---|---|---|",
              f"| input checkpoint | {fmt(results['base_test_accuracy'])} | |"]
    base = results["base_test_accuracy"]
    for key, value in results.items():
        if key.startswith("post_") and not key.endswith("_seconds"):
            variant = key[5:]
            scope = variant.split("-")[1]
            name = variant.split("-estimated")[0] if scope == "refit" and value.get("layer") else scope
            oracle = results.get(f"oracle_{name}")
            recovery = (value["test_accuracy"] - base) / (oracle - base) if oracle and oracle != base else None
            lines.append(f"| post-train {variant} (removed {value['removed']}, {value['seconds']:.0f} s) | {fmt(value['test_accuracy'])} | {fmt(recovery, 2)} |")
    for key, value in results.items():
        for prefix, label in (("refine_all_", "same recipe, nothing removed"), ("random_", "same recipe, random removal of the same size"),
                              ("lossrank_", "same recipe, the same number removed by the checkpoint's loss (one-shot)"),
                              ("oracle_", "same recipe, exactly the clean samples (oracle)")):
            if key.startswith(prefix) and not key.endswith("_seconds"):
                lines.append(f"| {label}: {key[len(prefix):]} | {fmt(value)} | |")
    if one_shot:
        lines += ["", f"Cost: `irank score` {one_shot['score_seconds']:.1f} s vs a plain inference pass {one_shot['inference_seconds']:.1f} s "
                      f"over the same DataLoader: ratio {one_shot['cost_ratio']:.2f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(report(setting) for setting in sys.argv[1:]))
