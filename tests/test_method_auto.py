"""`--method auto`: the probe's loss after a checkpoint that memorized its labels, its influence otherwise."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import irank
from irank import method_choice
from irank.boundary import choice_sample
from irank.manifest import read_manifest
from irank.method_choice import label_fit, resolve_method

RUN = irank.RunOptions(device="cpu", batch_size=32)


def test_resolve_method_rule():
    assert resolve_method("margin", "refit", None) == ("margin", "given")
    assert resolve_method("auto", "head", None)[0] == "influence"
    assert resolve_method("auto", "refit", 1.0)[0] == "loss"
    assert resolve_method("auto", "refit", method_choice.FITS_LABELS)[0] == "loss"
    chosen, how = resolve_method("auto", "refit", 0.8)
    assert chosen == "influence" and "80.0%" in how
    with pytest.raises(ValueError):
        resolve_method("auto", "refit", None)


def test_label_fit_counts_rows_whose_top_class_is_the_label():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    assert label_fit(logits, torch.tensor([0, 0, 0])) == (2, 3)


def head_fit(checkpoint: str, manifest: str) -> float:
    """The checkpoint's accuracy on the given labels, by `irank eval`'s own route."""
    return irank.evaluate(checkpoint, manifest, run_options=RUN)["accuracy"]


def by_id(result) -> pd.Series:
    return result.table.set_index("id")["score"].sort_index()


@pytest.mark.parametrize("layer", ["auto", "features.1"])
def test_auto_reads_the_heads_fit_and_scores_as_the_method_it_names(tiny_data, tiny_model, monkeypatch, layer):
    """Both sides of the rule on one checkpoint (the threshold moved around its measured fit); with --layer
    auto the fit comes from the choice pass, with a named layer from a pass over the sample."""
    boundary = irank.BoundaryOptions(layer=layer)
    fit = head_fit(tiny_model, tiny_data["train"])
    for threshold, expected in ((fit - 0.01, "loss"), (fit + 0.01, "influence")):
        monkeypatch.setattr(method_choice, "FITS_LABELS", threshold)
        auto = irank.score(tiny_model, tiny_data["train"], run_options=RUN, boundary=boundary)
        choice = auto.sidecar["parameters"]["method_choice"]
        assert choice["requested"] == "auto"
        assert choice["head_label_fit"] == pytest.approx(fit)
        assert auto.sidecar["method"] == expected
        named = irank.score(tiny_model, tiny_data["train"], run_options=RUN, boundary=boundary, method=expected)
        assert "method_choice" not in named.sidecar["parameters"]
        pd.testing.assert_series_equal(by_id(auto), by_id(named))


def test_auto_on_the_head_is_influence(tiny_data, tiny_model):
    head = irank.BoundaryOptions(kind="head", layer=None)
    auto = irank.score(tiny_model, tiny_data["train"], run_options=RUN, boundary=head)
    influence = irank.score(tiny_model, tiny_data["train"], run_options=RUN, boundary=head, method="influence")
    assert auto.sidecar["method"] == "influence"
    assert "head_label_fit" not in auto.sidecar["parameters"]["method_choice"]
    pd.testing.assert_series_equal(by_id(auto), by_id(influence))


def test_auto_fit_on_a_sample_of_a_larger_set(tiny_data, tiny_model):
    """Past --choice-rows the fit is read on the seeded sample only: it is the head's accuracy there."""
    result = irank.score(tiny_model, tiny_data["train"], run_options=RUN,
                         boundary=irank.BoundaryOptions(choice_rows=60, layer="features.1"))
    table = pd.read_csv(tiny_data["train"])
    sample = choice_sample(len(table), limit=60).numpy()
    model = irank.score(tiny_model, tiny_data["train"], run_options=RUN,
                        boundary=irank.BoundaryOptions(kind="head", layer=None), method="loss").table
    # the head's top class per row, in manifest order
    predicted = model.set_index("id").loc[read_manifest(tiny_data["train"]).ids, "predicted"].to_numpy()
    expected = float(np.mean(predicted[sample] == table["label"].to_numpy()[sample]))
    assert result.sidecar["parameters"]["method_choice"]["head_label_fit"] == pytest.approx(expected)


def test_cli_reports_what_auto_chose(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "scores.csv"
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "scores.csv.json").read_text())
    assert f"method: {sidecar['method']} (auto: the checkpoint's head reproduces" in " ".join(err.split())
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu",
                       "--influence-measure", "parameter-shift", "--overwrite")
    assert code == 3 and "--influence-measure parameter-shift: not on a refit probe" in err
