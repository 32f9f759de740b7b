"""Area under the margin (Pleiss et al. 2020): how hard a training fought each row's label.

At every step that sees a row, its margin is the given label's logit minus the largest other logit; averaged over
the steps of a fine-tune, it is the row's area under the margin (AUM). A clean row's label is learned early and
its margin stays high; a wrong label is learned late, if at all, against the pull of the row's look-alikes, so its
margin is low or negative for most of the run. A model's loss at the end of the run sees only where the row
ended; the average sees the whole path (docs/benchmarks/posttrain-default.md). Pure tensor functions.
"""

from __future__ import annotations

import torch


def given_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's given-label logit minus its largest other logit (in the logits' dtype, on their device):
    positive where the model agrees with the label."""
    given = logits.gather(1, labels[:, None]).squeeze(1)
    return given - logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values


def area_under_margin(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each row's mean margin over the steps that saw it (`sums` of its margins, `counts` of those steps)."""
    if bool((counts <= 0).any()):
        raise ValueError(f"{int((counts <= 0).sum())} rows were never seen by the training")
    return sums.double() / counts.double()
