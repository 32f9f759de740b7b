"""`--method auto`: which score to rank by, from whether the checkpoint fits its given labels.

On a refit probe, the probe's own loss ranks wrong labels better than its self-influence after a network
that memorized its noisy labels, and about as well (a little worse) after one that did not: the
influence's leverage factor favours atypical images, and the probe of a memorized network's middle
layers sees many of them (README, "Which boundary", has the measurements). Whether the network
memorized is read off its own head: a head that reproduces at least FITS_LABELS of the given labels
fitted them all, wrong ones included. On the checkpoint's own head, auto is influence, the paper's score.
"""

from __future__ import annotations

import torch

FITS_LABELS = 0.99


def label_fit(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(rows whose top class is their given label, rows): the head's agreement with the given labels."""
    return int((logits.argmax(1) == labels).sum()), len(labels)


def resolve_method(method: str, boundary: str, fit: float | None) -> tuple[str, str]:
    """(the method to rank by, why). `fit`: the share of the given labels the checkpoint's head reproduces
    (needed for `auto` on a refit boundary only)."""
    if method != "auto":
        return method, "given"
    if boundary == "head":
        return "influence", "auto: influence on the checkpoint's own head"
    if fit is None:
        raise ValueError("--method auto on a refit boundary needs the head's agreement with the labels")
    if fit >= FITS_LABELS:
        return "loss", (f"auto: the checkpoint's head reproduces {fit:.1%} of the given labels (it memorized them), "
                        "where the probe's loss ranks better than its influence")
    return "influence", (f"auto: the checkpoint's head reproduces {fit:.1%} of the given labels (it did not memorize "
                         "them), where the probe's influence ranks as well as its loss or better")
