"""The joint loss: a row's place among all rows under the probe's loss and under the head's loss, averaged.

The two losses fail in different places. A probe refit at an earlier layer cannot bend around memorized labels,
so on a checkpoint that memorized them (plain SGD, no augmentation) it ranks wrong labels far better than the
head; but where the noise imitates human mistakes, the earlier layers find the same images confusing, and the
head's loss, even memorized, can rank better than the probe. Averaging the two rankings held on every base of the
benchmark suite (docs/benchmarks/suite.md): AUROC mean 0.824 and worst 0.783 over five bases, against 0.822 and
0.740 for the probe's loss alone and 0.792 and 0.689 for the head's loss alone, and never below the head's loss
there. Of five bases held out from the choice it stayed ahead of the head's loss on four and fell 0.010 behind
it on the fifth (pair flips); over all ten: mean 0.833, worst 0.781 (probe 0.826 / 0.740, head 0.813 /
0.689).

Ranks, not values: a memorizing head's losses are all near zero and a probe's are not, so a sum of the losses
is the probe's loss alone (measured: worst 0.742); ranks need no scale. The score is a share in (0, 1]: the
mean, over the two losses, of the share of rows ranked at or below the row (ties share their mean place), so 0.95
means "on average ahead of 95% of the rows". It has no units: a threshold on it is a share of rows, not a loss.
Pure tensor functions.
"""

from __future__ import annotations

import torch

from irank.core.protocols import Shard


def rank_shares(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each value's rank among all of them from the lowest (1) up, divided by their number: a share in (0, 1]
    (float64). Equal values share their mean rank, so the result does not depend on their order. `out`: a float64
    tensor of the same length to add the shares to (in place), instead of a new one."""
    values = values.reshape(-1)
    count = len(values)
    shares = torch.zeros(count, dtype=torch.float64) if out is None else out
    if count == 0:
        return shares
    ordered, order = torch.sort(values.double())
    _, counts = torch.unique_consecutive(ordered, return_counts=True)
    del ordered  # a row's place in `order` is all that is needed now
    if len(counts) == count:  # no ties: the row at place i has rank i + 1
        in_order = torch.arange(1, count + 1, dtype=torch.float64)
    else:  # a group's mean rank: its last member's rank less half of the rest
        group_ends = torch.cumsum(counts, 0).double()
        group_ends -= (counts.double() - 1) / 2
        in_order = torch.repeat_interleave(group_ends, counts)
        del group_ends
    del counts
    in_order /= count
    shares.index_add_(0, order, in_order)
    return shares


def joint_loss(probe_loss: torch.Tensor, head_loss: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
    """The mean of the two losses' rank shares, row by row (higher = more suspect; float64).

    With a `shard` (torchrun) the losses given are this process's rows of a contiguous block; the ranks are
    among every process's rows, and this process's rows are returned. About 40 bytes a row of every row beside
    the two losses (docs/benchmarks/memory.md).
    """
    if probe_loss.shape != head_loss.shape:
        raise ValueError(f"the two losses differ in shape: {tuple(probe_loss.shape)} and {tuple(head_loss.shape)}")
    if shard is None:
        joint = rank_shares(probe_loss)
        return rank_shares(head_loss, out=joint).div_(2)
    start = shard.start
    assert start is not None, "the joint loss needs a contiguous block of rows"
    joint = rank_shares(shard.gather(probe_loss.double()))
    joint = rank_shares(shard.gather(head_loss.double()), out=joint).div_(2)
    return joint[start:start + len(probe_loss)].clone()
