"""A CI gate on a scores table: fail a data set whose share of suspect samples is over a threshold.

Two measures: the estimated share of mislabeled samples (`estimate.estimate_noise_share`), or, with
`fail_score`, the share of samples whose influence score is at least that value. The gate only
reports; the caller decides what failing means (the CLI exits with code 4 after writing its output).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from irank.core.estimate import estimate_noise_share
from irank.runtime.errors import UsageError


@dataclass(frozen=True)
class GateVerdict:
    measure: str  # "estimated_noise_share" or "share_score_at_least"
    share: float
    fail_over: float
    fail_score: float | None
    failed: bool
    reason: str  # one line for people

    def to_dict(self) -> dict:
        return asdict(self)


def validate_gate(fail_over: float | None, fail_score: float | None, boundary: str = "head") -> None:
    """Refuse gate flags that cannot work, before any scoring is done."""
    if fail_score is not None and fail_over is None:
        raise UsageError("--fail-score needs --fail-over F (the share of samples allowed at or above the score)")
    if fail_over is not None and not 0 <= fail_over <= 1:
        raise UsageError(f"--fail-over {fail_over}: must be a share between 0 and 1")
    if fail_score is not None and not math.isfinite(fail_score):
        raise UsageError(f"--fail-score {fail_score}: must be a finite number")
    if fail_over is not None and fail_score is None and boundary != "head":
        raise UsageError(
            "--fail-over estimates the share of mislabeled samples from where the checkpoint's own head "
            "disagrees with the labels; a refit probe disagrees with 27% of clean CIFAR-10 labels, so add "
            "--boundary head, or gate on the share of high scores with --fail-score T"
        )


def check_gate(table: pd.DataFrame, *, fail_over: float, fail_score: float | None = None) -> GateVerdict:
    """Does the scored data set pass? It fails when the measured share is strictly greater than `fail_over`."""
    validate_gate(fail_over, fail_score)
    if fail_score is None:
        estimate = estimate_noise_share(table)
        share, measure = estimate["share"], "estimated_noise_share"
        what = f"estimated share of mislabeled samples {share:.4f} ({estimate['reason']})"
    else:
        scores = pd.to_numeric(table["score"], errors="coerce").to_numpy(np.float64)
        share, measure = float(np.mean(scores >= fail_score)) if len(scores) else 0.0, "share_score_at_least"
        what = f"share of samples with score >= {fail_score:g} is {share:.4f}"
    failed = share > fail_over
    verdict = "exceeds" if failed else "is within"
    return GateVerdict(measure=measure, share=share, fail_over=fail_over, fail_score=fail_score, failed=failed,
                       reason=f"{what}, which {verdict} --fail-over {fail_over:g}")
