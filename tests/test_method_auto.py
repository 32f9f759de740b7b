"""`--method auto`: influence on the checkpoint's head, the probe's loss on a refit probe."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import irank
from irank.core.methods import resolve_method

RUN = irank.RunOptions(device="cpu", batch_size=32)


def test_resolve_method_rule():
    assert resolve_method("margin", "refit") == ("margin", "given")
    assert resolve_method("influence", "refit")[0] == "influence"
    assert resolve_method("auto", "head")[0] == "influence"
    assert resolve_method("auto", "refit")[0] == "loss"


def by_id(result) -> pd.Series:
    return result.table.set_index("id")["score"].sort_index()


@pytest.mark.parametrize("boundary, expected", [
    (irank.BoundaryOptions(), "loss"),
    (irank.BoundaryOptions(layer="features.1"), "loss"),
    (irank.BoundaryOptions(kind="head", layer=None), "influence"),
])
def test_auto_scores_as_the_method_it_names(tiny_data, tiny_model, boundary, expected):
    auto = irank.score(tiny_model, tiny_data["train"], run_options=RUN, boundary=boundary)
    assert auto.sidecar["method"] == expected
    assert auto.sidecar["parameters"]["method_choice"]["requested"] == "auto"
    named = irank.score(tiny_model, tiny_data["train"], run_options=RUN, boundary=boundary, method=expected)
    assert named.sidecar["method"] == expected and "method_choice" not in named.sidecar["parameters"]
    pd.testing.assert_series_equal(by_id(auto), by_id(named))
    other = "influence" if expected == "loss" else "loss"
    changed = irank.score(tiny_model, tiny_data["train"], run_options=RUN, boundary=boundary, method=other)
    assert not by_id(changed).equals(by_id(auto))  # the method given is the one used


def test_cli_says_what_auto_chose(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "scores.csv"
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "scores.csv.json").read_text())
    assert sidecar["method"] == "loss" and sidecar["parameters"]["influence_measure"] is None
    assert "method: loss (auto: the probe's loss" in " ".join(err.split())
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu",
                       "--influence-measure", "parameter-shift", "--overwrite")
    assert code == 3 and "--influence-measure parameter-shift: not on a refit probe" in err


def test_an_influence_measure_given_with_auto_ranks_by_influence(cli, tiny_data, tiny_model, tmp_path):
    """Before, `--influence-measure boundary-shift` with the default `--method auto` did nothing on a refit probe."""
    sidecars = {}
    for name, extra in (("auto", []), ("measure", ["--influence-measure", "boundary-shift"]),
                        ("named", ["--method", "influence", "--influence-measure", "boundary-shift"])):
        output = tmp_path / f"{name}.csv"
        code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu", *extra)
        assert code == 0, err
        sidecars[name] = json.loads((tmp_path / f"{name}.csv.json").read_text())
        if name == "measure":
            assert "--influence-measure boundary-shift given: ranking by influence" in " ".join(err.split())
    assert sidecars["auto"]["method"] == "loss"
    assert sidecars["measure"]["method"] == "influence"
    assert sidecars["measure"]["parameters"]["influence_measure"] == "boundary-shift"
    scores = {name: pd.read_csv(tmp_path / f"{name}.csv").set_index("id")["score"].sort_index() for name in sidecars}
    pd.testing.assert_series_equal(scores["measure"], scores["named"])
    assert not scores["measure"].equals(scores["auto"])
