"""New users do not get stuck: warnings that save a run, and a summary of how bad the data is."""

from __future__ import annotations

import json

import pandas as pd
import torch
from test_trust import with_metadata

from irank.model.checkpoint import read_checkpoint


def test_score_says_how_bad_the_data_is(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "s.csv"
    code, stdout, err = cli("score", tiny_model, tiny_data["train"], "-o", out, "--boundary", "head", "--json")
    assert code == 0, err
    summary = json.loads(stdout)["summary"]
    table = pd.read_csv(out)
    wrong = table[table["label"] != table["predicted"]]
    assert summary["estimated_issues"] == len(wrong) and isinstance(summary["estimated_issues"], int)
    pairs = wrong.groupby(["label", "predicted"]).size().sort_values(ascending=False)
    assert [pair["count"] for pair in summary["confused_pairs"]] == sorted(pairs.tolist(), reverse=True)
    assert all(pair["given"] != pair["suggested"] for pair in summary["confused_pairs"])
    assert sum(row["estimated_issues"] for row in summary["per_class"].values()) == len(wrong)
    assert json.loads((tmp_path / "s.csv.json").read_text())["summary"] == summary  # the sidecar says it too
    assert "estimated wrong labels:" in err and "most confused (given → suggested):" in err


def test_a_checkpoint_without_preprocessing_is_warned_of(cli, tiny_data, tiny_model, tmp_path):
    torch.save(read_checkpoint(tiny_model).state_dict, tmp_path / "plain.pt")
    code, _, err = cli("score", tmp_path / "plain.pt", tiny_data["train"], "-o", tmp_path / "s.csv", "--arch",
                       "tiny-cnn", "--boundary", "head")
    assert code == 0, err
    assert "records no preprocessing and none was given" in " ".join(err.split())
    code, _, err = cli("score", tmp_path / "plain.pt", tiny_data["train"], "-o", tmp_path / "s2.csv", "--arch",
                       "tiny-cnn", "--boundary", "head", "--preprocess", "none")
    assert code == 0 and "records no preprocessing" not in " ".join(err.split()), err
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s3.csv", "--boundary", "head")
    assert code == 0 and "records no preprocessing" not in " ".join(err.split()), err  # irank's own records it


def test_a_checkpoint_that_fits_its_labels_poorly_is_warned_of(cli, tiny_data, tiny_model, tmp_path):
    classes = read_checkpoint(tiny_model).metadata["classes"]
    shuffled = with_metadata(tiny_model, tmp_path / "wrong-order.safetensors", classes=classes[1:] + classes[:1])
    for boundary in ("head", "refit"):
        code, stdout, err = cli("score", shuffled, tiny_data["train"], "-o", tmp_path / f"{boundary}.csv",
                                "--boundary", boundary, "--json")
        assert code == 0, err
        fit = json.loads(stdout)["parameters"]["head_label_fit"]
        assert fit < 0.5 and "predicts only" in " ".join(err.split()), (boundary, err)
    code, stdout, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "fine.csv", "--json")
    assert code == 0 and json.loads(stdout)["parameters"]["head_label_fit"] > 0.8 and "predicts only" not in err


def test_a_refine_that_diverges_is_warned_of(cli, tiny_data, tiny_model, tmp_path):
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", tmp_path / "r.safetensors", "--scope", "full",
                       "--epochs", "3", "--lr", "40", "--device", "cpu")
    assert code == 0, err
    assert "the run diverged; try a lower --lr than 40" in " ".join(err.split())
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", tmp_path / "ok.safetensors", "--epochs", "2",
                       "--device", "cpu")
    assert code == 0 and "diverged" not in err, err


def test_more_than_half_disagreeing_is_warned_of(cli, tiny_data, tiny_model, tmp_path):
    table = pd.read_csv(tiny_data["train"])
    classes = sorted(table["label"].unique())
    shift = {name: classes[(i + 1) % len(classes)] for i, name in enumerate(classes)}
    table.loc[table.index % 10 < 7, "label"] = table["label"].map(shift)  # 70% of the labels moved
    table["path"] = [f"{tiny_data['folder']}/{path}" for path in table["path"]]
    table.to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = cli("score", tiny_model, tmp_path / "bad.csv", "-o", tmp_path / "s.csv", "--boundary", "head",
                       "--allow-outside-root")
    assert code == 0, err
    assert "more than half" in " ".join(err.split())


def test_post_train_warns_of_a_budget_above_half_the_rows():
    from irank.workflows.post_train.ranking import warn_of_a_large_budget

    said = []

    class Recorder:
        def warn(self, message):
            said.append(message)

    warn_of_a_large_budget(0.3, Recorder())
    warn_of_a_large_budget(0.6, Recorder())
    assert len(said) == 1 and "60%" in said[0] and "--budget" in said[0]


def test_score_help_puts_what_a_first_run_needs_first_and_the_expert_flags_apart():
    import re
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "irank", "score", "--help"], capture_output=True, text=True,
                          env={"COLUMNS": "200", "PATH": "", **__import__("os").environ})
    text = re.sub(r"\s+", " ", done.stdout)
    model, ranking, expert = (text.index(title) for title in ("Model and preprocessing", "Ranking", "Expert"))
    assert model < ranking < expert
    assert model < text.index("--arch", model) < text.index("--preprocess", model) < ranking
    assert ranking < text.index("--boundary", ranking) < expert
    assert all(text.index(flag, expert) > expert and flag not in text[text.index("Options"):expert]
               for flag in ("--curvature", "--damping", "--influence-measure"))
    assert "irank score model.pt data/train -o scores.csv --arch resnet18 --preprocess imagenet" in text
    assert "influence" not in text[:text.index("By default")]  # the first line names what the default ranks by
