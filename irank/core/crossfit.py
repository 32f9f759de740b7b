"""Cross-fitting: two halves of the rows, a model fine-tuned on each, every row judged in and out of sample.

A model fine-tuned on a row has seen its label and bends toward it, however robust its loss; a model fine-tuned
on the other half has not. `post-train --strategy crossfit` fine-tunes the user's checkpoint once on each half
(`halves`), scores every row under both models, and ranks by `in_and_out`: the mean of the row's rank share among
all rows under the model that trained on it (in sample) and under the one that did not (out of sample). On the
benchmark suite (docs/benchmarks/posttrain-default.md) the two together ranked better than either alone, and than
the loss of unlearn's one fine-tune on every row on every base with human-like noise (AUROC 0.871-0.877 against
0.847-0.862), but below unlearn's default judgement, which adds that fine-tune's margins (0.884-0.888).
Pure tensor functions.
"""

from __future__ import annotations

import torch

from irank.core.joint import rank_shares

HALVES = 2


def halves(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each row's half, 0 or 1 (int64): within every label a seeded shuffle deals its rows out in turn, so both
    halves hold every class in the same proportion (one more row in half 0 where a class's count is odd). The
    same labels and seed give the same halves on every machine. O(rows log rows), whatever the classes."""
    labels = torch.as_tensor(labels).reshape(-1)
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = shuffled[torch.sort(labels[shuffled], stable=True).indices]  # by label, shuffled within each
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    half = torch.empty(len(labels), dtype=torch.int64)
    half[order] = (torch.arange(len(labels)) - starts) % HALVES  # each row's place among its label's rows
    return half


def in_and_out(scores: tuple[torch.Tensor, torch.Tensor], half: torch.Tensor) -> torch.Tensor:
    """Each row's suspicion from two models' scores of every row (`scores[k]`: the model fine-tuned on half k;
    higher = more suspect): the mean of its rank share in sample (under `scores[half]`) and out of sample (under
    the other), each among all rows (`irank.core.joint.rank_shares`). A share in (0, 1], float64."""
    first, second = (torch.as_tensor(values).reshape(-1) for values in scores)
    half = torch.as_tensor(half).reshape(-1)
    if not len(first) == len(second) == len(half):
        raise ValueError(f"scores of {len(first)} and {len(second)} rows for {len(half)} rows' halves")
    joint = rank_shares(pick_rows((first, second), half, in_sample=True))
    return rank_shares(pick_rows((first, second), half, in_sample=False), out=joint).div_(2)


def pick_rows(values: tuple[torch.Tensor, torch.Tensor], half: torch.Tensor, in_sample: bool = True) -> torch.Tensor:
    """Row by row, `values[half]` (`in_sample`) or the other model's (rows × anything)."""
    chosen = half if in_sample else 1 - half
    first, second = values
    mask = (chosen == 0).reshape(-1, *([1] * (first.dim() - 1)))
    return torch.where(mask, first, second)
