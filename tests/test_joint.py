"""The joint loss: the probe's loss and the head's, their ranks averaged (irank.core.joint)."""

from __future__ import annotations

import pytest
import torch

from irank.core.joint import joint_loss, rank_shares


def test_rank_shares_are_ranks_over_n_with_ties_sharing_their_mean():
    shares = rank_shares(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0]))
    assert shares.tolist() == pytest.approx([4 / 5, 1 / 5, 2.5 / 5, 2.5 / 5, 5 / 5])
    assert rank_shares(torch.zeros(4)).tolist() == pytest.approx([2.5 / 4] * 4)  # all tied: the mean place
    assert len(rank_shares(torch.zeros(0))) == 0


def test_rank_shares_do_not_depend_on_scale_or_order():
    torch.manual_seed(0)
    values = torch.randn(200).round(decimals=1)  # many ties
    permutation = torch.randperm(200)
    assert torch.equal(rank_shares(values)[permutation], rank_shares(values[permutation]))
    assert torch.equal(rank_shares(values), rank_shares(torch.exp(3 * values) * 1e-9))  # any increasing map


def test_the_joint_loss_averages_the_two_rankings():
    probe = torch.tensor([0.1, 0.9, 0.5, 2.0])
    head = torch.tensor([1e-9, 1e-3, 1e-6, 1e-12])  # a memorizing head: tiny losses, still an order
    joint = joint_loss(probe, head)
    assert joint.tolist() == pytest.approx([(1 / 4 + 2 / 4) / 2, (3 / 4 + 4 / 4) / 2, (2 / 4 + 3 / 4) / 2,
                                            (4 / 4 + 1 / 4) / 2])
    assert joint.dtype == torch.float64 and bool(((joint > 0) & (joint <= 1)).all())
    # a row first by both losses is first by the joint loss
    assert int(joint_loss(probe, probe).argmax()) == 3


class _Block:
    """A stand-in for torchrun's Shard: this process holds rows [start, start + n) out of `total`; `gather` returns
    every process's rows, here the ones given in the order the joint loss asks (the probe's, then the head's)."""

    def __init__(self, start: int, total: int, gathered: list[torch.Tensor]):
        self.start, self.total, self.gathered = start, total, gathered

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        every = self.gathered.pop(0)
        assert torch.equal(every[self.start:self.start + len(values)], values)  # this process's block of them
        return every


def test_under_torchrun_ranks_are_among_every_process_rows():
    torch.manual_seed(1)
    probe, head = torch.rand(10, dtype=torch.float64), torch.rand(10, dtype=torch.float64)
    whole = joint_loss(probe, head)
    block = _Block(6, 10, [probe, head])
    assert torch.equal(joint_loss(probe[6:], head[6:], block), whole[6:])
    assert not torch.equal(joint_loss(probe[6:], head[6:]), whole[6:])  # ranked among its own rows only: not so


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ in shape"):
        joint_loss(torch.zeros(3), torch.zeros(4))
