"""Scores on the checkpoint's own head: its influence (the paper's score), loss, margin or gradient norm."""

from __future__ import annotations

import torch

from irank.core import influence
from irank.core.protocols import Shard


def method_scores(
    method: str,
    logits: torch.Tensor,
    head_inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    has_bias: bool = True,
    damping: float = 0.01,
    measure: str = "self-influence",
    curvature: str = "auto",
    shard: Shard | None = None,
) -> tuple[torch.Tensor, dict]:
    """Score every sample with `method` (higher = more likely mislabeled); also say how.

    With a `shard` (torchrun) the rows given are this process's, and influence uses every process's curvature.
    """
    if method == "influence":
        scores, used = influence.influence_scores(
            logits, head_inputs, labels, has_bias=has_bias, damping=damping, measure=measure, curvature=curvature,
            shard=shard,
        )
        return scores, {"influence_measure": measure, "curvature": used, "damping": damping}
    if method == "loss":
        return influence.cross_entropy(logits, labels), {}
    if method == "margin":
        return influence.negative_margin(logits, labels), {}
    if method == "gradnorm":
        return influence.gradient_norm(logits, head_inputs, labels, has_bias=has_bias), {}
    raise ValueError(f"unknown method {method!r} (resolve auto first)")
