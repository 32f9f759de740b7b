"""Estimates of the noise rate from each base's default post-train run, against the true rate.

`python benchmarks/budgets.py` prints a markdown table (docs/benchmarks/posttrain-default.md, "The budget on
human-like noise") from outputs/NAME/post-train-aum (its scores.csv and margins.safetensors): the shipped
estimate (the share of rows whose label the fine-tuned model does not predict), the share of rows whose area
under the margin is below zero, confident learning's count on the fine-tuned model (the rows predicted as
another class with a probability at least that class's mean self-confidence) and the mean of 1 − p(label).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bases import NAMES, parse  # noqa: E402
from common import DATA, OUTPUTS  # noqa: E402


def estimates(name: str) -> dict | None:
    """The true rate and each estimate on one base; None where its post-train-aum run has not finished."""
    run = OUTPUTS / name / "post-train-aum"
    if not (run / "scores.csv").exists() or not (run / "margins.safetensors").exists():
        return None
    manifest = pd.read_csv(DATA / f"train-{parse(name)[1]}.csv")
    table = pd.read_csv(run / "scores.csv").set_index("id").reindex(manifest.path)  # the margins' order
    area = load_file(str(run / "margins.safetensors"))["area_under_margin"]
    disagrees = (table.label != table.predicted).to_numpy()
    confidence = table.groupby("label")["label_prob"].mean()  # each class's mean self-confidence
    confident = disagrees & (table.predicted_prob.to_numpy() >= confidence.reindex(table.predicted).to_numpy())
    return {"wrong": float((manifest.label != manifest.true_label).mean()), "disagreement": float(disagrees.mean()),
            "aum_below_zero": float((area < 0).mean()), "confident": float(confident.mean()),
            "expected": float((1 - table.label_prob).mean())}


def main() -> None:
    """Print the table over every base with a finished run."""
    print("| base | wrong | disagreement (shipped) | AUM < 0 | confident disagreement | mean of 1 − p(label) |")
    print("|---|---|---|---|---|---|")
    for name in NAMES:
        row = estimates(name)
        if row is not None:
            print(f"| `{name}` | " + " | ".join(f"{100 * value:.1f}%" for value in row.values()) + " |")


if __name__ == "__main__":
    main()
