"""Markdown tables from bench-out/<setting>/results.json (written by posttrain_cifar.py).

    python benchmarks/cifar/report.py ce-sym40 ce-sym20 ...
    python benchmarks/cifar/report.py --default ce-sym40 ce-sym20 ...   # post-train's default (unlearn), one row a setting
    python benchmarks/cifar/report.py --epochs ce-sym40                 # the default with other --epochs (--unlearn-epochs)
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
        if key.startswith("post_unlearn") and not key.endswith("_seconds"):
            lines.append(f"| post-train's default, unlearn (removed {value['removed']}, {value['seconds']:.0f} s) | "
                         f"{fmt(value['test_accuracy'])} | |")
        elif key.startswith("post_") and not key.endswith("_seconds"):
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


def default_row(setting: str) -> str:
    """One row of the default's table: the input (test accuracy, the default `score`'s ranking as method_auto.py
    measured it), then post-train's default (its ranking, its removal with the estimated budget, its model's test
    accuracy, its time)."""
    from posttrain_cifar import base_paths, truth_mask

    results = json.loads((ROOT / "bench-out" / setting / "results.json").read_text())
    unlearn = results["post_unlearn"]
    corrupted = truth_mask(base_paths(setting)[1])
    if corrupted.any():  # the default score's ranking: from benchmarks/cifar/method_auto.py
        before = json.loads((ROOT / "bench-out" / "method-auto.json").read_text())[setting]["auto"]
        ranks = (f"{fmt(before['auroc'])} / {fmt(before['precision_at_k'])} | "
                 f"**{fmt(unlearn['gradual']['auroc'])} / {fmt(unlearn['gradual']['precision_at_k'])}**")
        removal = (f"{unlearn['removed']:,} ({unlearn['budget']:.1%}): precision {fmt(unlearn['removed_precision'])}, "
                   f"recall {fmt(unlearn['removed_recall'])}")
    else:
        ranks, removal = "— | —", f"{unlearn['removed']:,} ({unlearn['budget']:.1%}), every one clean"
    return (f"| `{setting}` | {int(corrupted.sum()):,} | {ranks} | {removal} | {fmt(results['base_test_accuracy'])} → "
            f"**{fmt(unlearn['test_accuracy'])}** | {unlearn['seconds'] / 60:.1f} |")


def epochs_table(setting: str) -> str:
    """post-train's default on `setting` against the same with other --epochs: ranking, test accuracy, time."""
    results = json.loads((ROOT / "bench-out" / setting / "results.json").read_text())
    runs = {30: results["post_unlearn"]}
    runs.update({int(key.split("-e")[1]): value for key, value in results.items()
                 if key.startswith("post_unlearn-e") and not key.endswith("_seconds")})
    lines = ["| `--epochs` | AUROC / precision at k | test accuracy | minutes |", "|---|---|---|---|"]
    for epochs, run in sorted(runs.items()):
        lines.append(f"| {epochs}{' (default)' if epochs == 30 else ''} | {fmt(run['gradual']['auroc'])} / "
                     f"{fmt(run['gradual']['precision_at_k'])} | {fmt(run['test_accuracy'])} | {run['seconds'] / 60:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--epochs":
        print("\n\n".join(epochs_table(setting) for setting in sys.argv[2:]))
    elif sys.argv[1] == "--default":
        print("| base | wrong labels | default `score` on the input: AUROC / precision at k | `post-train` (unlearn): "
              "AUROC / precision at k | removed, estimated budget | test accuracy, input → post-train | minutes |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(default_row(setting) for setting in sys.argv[2:]))
    else:
        print("\n\n".join(report(setting) for setting in sys.argv[1:]))
