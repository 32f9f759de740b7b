"""Area under the margin (irank.core.margins) and the log that sums it during a training (irank.model.margin_log)."""

from __future__ import annotations

import pytest
import torch
from test_resume import StopAfterEpoch

import irank
from irank.core.margins import area_under_margin, given_margins
from irank.model.margin_log import MarginLog


def test_given_margins_are_the_given_logit_minus_the_best_other():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    assert given_margins(logits, labels).tolist() == [1.5, -2.0, 0.0]  # agrees, disagrees, a tie


def test_area_under_margin_is_the_mean_over_the_steps_that_saw_each_row():
    sums, counts = torch.tensor([3.0, -2.0, 0.5]), torch.tensor([3.0, 2.0, 1.0])
    assert area_under_margin(sums, counts).tolist() == [1.0, -1.0, 0.5]
    with pytest.raises(ValueError, match="1 rows were never seen"):
        area_under_margin(sums, torch.tensor([3.0, 0.0, 1.0]))


def test_the_log_sums_each_rows_margins_over_the_batches_that_held_it():
    log = MarginLog(3)
    log.add(torch.tensor([2, 0]), torch.tensor([[0.0, 1.0], [3.0, 1.0]]), torch.tensor([1, 0]))  # margins 1, 2
    log.add(torch.tensor([1, 2]), torch.tensor([[0.0, 4.0], [2.0, 0.0]]), torch.tensor([0, 1]))  # margins -4, -2
    log.add(torch.tensor([0]), torch.tensor([[0.0, 1.0]]), torch.tensor([0]))  # margin -1
    assert log.area_under_margin().tolist() == [0.5, -4.0, -0.5]
    restored = MarginLog(3)
    restored.restore(log.state())
    restored.add(torch.tensor([1]), torch.tensor([[0.0, 2.0]]), torch.tensor([0]))  # margin -2, counted on
    assert restored.area_under_margin().tolist() == [0.5, -3.0, -0.5]


def refine(tiny_data, tiny_model, output, **kwargs):
    options = irank.TrainOptions(scope="full", epochs=3, lr=0.05, augment="flip", seed=3)
    return irank.refine(tiny_model, tiny_data["train"], output=str(output), train_options=options,
                        run_options=irank.RunOptions(device="cpu", batch_size=32), **kwargs)


def test_a_fine_tune_logs_every_rows_margin_once_an_epoch_and_a_resumed_one_the_same(tiny_data, tiny_model, tmp_path):
    whole = MarginLog(240)
    refine(tiny_data, tiny_model, tmp_path / "whole.safetensors", margins=whole)
    assert whole.counts.tolist() == [3.0] * 240  # every row, once in each of the 3 epochs
    aum = whole.area_under_margin()
    assert aum.std() > 0 and not torch.isnan(aum).any()
    resumed = MarginLog(240)
    with pytest.raises(KeyboardInterrupt):
        refine(tiny_data, tiny_model, tmp_path / "r.safetensors", margins=resumed, reporter=StopAfterEpoch(2))
    again = MarginLog(240)  # a new process: the first two epochs' sums come back from the saved state
    refine(tiny_data, tiny_model, tmp_path / "r.safetensors", margins=again, resume=True)
    assert torch.equal(again.area_under_margin(), aum)


def test_a_state_saved_without_margins_is_not_resumed_by_a_run_that_logs_them(tiny_data, tiny_model, tmp_path):
    output = tmp_path / "r.safetensors"
    with pytest.raises(KeyboardInterrupt):
        refine(tiny_data, tiny_model, output, reporter=StopAfterEpoch(1))
    log = MarginLog(240)
    refine(tiny_data, tiny_model, output, margins=log, resume="auto")  # "auto": a mismatched state starts afresh
    assert log.counts.tolist() == [3.0] * 240
