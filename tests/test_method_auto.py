"""`--method auto`: influence on the checkpoint's head, the joint loss on a refit probe (the probe's loss with
`--fail-score`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import irank
from irank.core.methods import resolve_method

RUN = irank.RunOptions(device="cpu", batch_size=32)


def test_resolve_method_rule():
    assert resolve_method("margin", "refit") == ("margin", "given")
    assert resolve_method("influence", "refit")[0] == "influence"
    assert resolve_method("auto", "head")[0] == "influence"
    assert resolve_method("auto", "refit")[0] == "joint-loss"


def by_id(result) -> pd.Series:
    return result.table.set_index("id")["score"].sort_index()


@pytest.mark.parametrize("boundary, expected", [
    (irank.BoundaryOptions(), "joint-loss"),
    (irank.BoundaryOptions(layer="features.1"), "joint-loss"),
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
    assert sidecar["method"] == "joint-loss" and sidecar["parameters"]["influence_measure"] is None
    assert "method: joint-loss (auto: the joint loss" in " ".join(err.split())
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
    assert sidecars["auto"]["method"] == "joint-loss"
    assert sidecars["measure"]["method"] == "influence"
    assert sidecars["measure"]["parameters"]["influence_measure"] == "boundary-shift"
    scores = {name: pd.read_csv(tmp_path / f"{name}.csv").set_index("id")["score"].sort_index() for name in sidecars}
    pd.testing.assert_series_equal(scores["measure"], scores["named"])
    assert not scores["measure"].equals(scores["auto"])


def test_the_joint_loss_averages_the_probes_and_the_heads_rankings(cli, tiny_data, tiny_model, tmp_path):
    """The default's scores, from the two rankings irank writes on their own: the probe's loss at the same layer and
    the head's loss; every score a mean share of rows in (0, 1]."""
    from irank.core.joint import rank_shares

    runs = {"joint": [], "probe": ["--method", "loss"], "head": ["--boundary", "head", "--method", "loss"]}
    scores = {}
    for name, extra in runs.items():
        output = tmp_path / f"{name}.csv"
        code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu", "-q", *extra)
        assert code == 0, err
        scores[name] = pd.read_csv(output).set_index("id")["score"].sort_index()
    layers = {name: json.loads((tmp_path / f"{name}.csv.json").read_text())["parameters"].get("layer")
              for name in ("joint", "probe")}
    assert layers["joint"] == layers["probe"]
    probe, head = (torch.tensor(scores[name].to_numpy()) for name in ("probe", "head"))
    expected = ((rank_shares(probe) + rank_shares(head)) / 2).numpy()
    assert np.allclose(scores["joint"].to_numpy(), expected, rtol=1e-12, atol=0)
    assert scores["joint"].between(0, 1, inclusive="right").all()
    assert not np.allclose(expected, rank_shares(probe).numpy())  # the head's ranking moved it


def test_a_gate_on_score_values_keeps_auto_on_the_probes_loss(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "scores.csv"
    code, out, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu", "--json",
                         "--fail-over", "1", "--fail-score", "2.0")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["method"] == "loss" and "--fail-score needs a score with units" in payload["parameters"][
        "method_choice"]["how"]
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "named.csv", "--device", "cpu",
                       "--fail-over", "1", "--fail-score", "0.9", "--method", "joint-loss")
    assert code == 3 and "--method joint-loss scores are shares of rows" in " ".join(err.split())
    assert not (tmp_path / "named.csv").exists()


def test_the_joint_loss_needs_a_refit_probe(cli, tiny_data, tiny_model, tmp_path):
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s.csv", "--device", "cpu",
                       "--boundary", "head", "--method", "joint-loss")
    assert code == 3 and "it needs --boundary refit" in " ".join(err.split())
    assert not (tmp_path / "s.csv").exists()
