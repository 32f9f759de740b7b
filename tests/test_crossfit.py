"""post-train --strategy crossfit: the halves, the in-and-out ranking (irank.core.crossfit), the run's files,
refusals and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from irank.core.crossfit import halves, in_and_out, pick_rows
from irank.core.joint import rank_shares
from irank.model.checkpoint import read_checkpoint
from irank.options import LoopOptions, RunOptions, TrainOptions

CROSSFIT_FILES = ["final.safetensors", "fold0.csv", "fold0.csv.json", "fold0.safetensors", "fold1.csv",
                  "fold1.csv.json", "fold1.safetensors", "kept.csv", "kept.csv.json", "removed.csv", "scores.csv",
                  "scores.csv.json", "summary.json"]


def test_halves_split_every_label_evenly_and_the_same_way_each_time():
    labels = torch.tensor([0] * 7 + [1] * 10 + [2] * 1 + [0] * 3)
    half = halves(labels)
    assert set(half.tolist()) == {0, 1}
    for label, count in ((0, 10), (1, 10), (2, 1)):
        in_first = int((half[labels == label] == 0).sum())
        assert in_first == (count + 1) // 2  # half 0 gets the odd row
    assert torch.equal(half, halves(labels.clone()))
    assert any(not torch.equal(half, halves(labels, seed)) for seed in range(1, 5))  # the seed shuffles


def test_in_and_out_averages_each_rows_rank_share_in_and_out_of_sample():
    half = torch.tensor([0, 0, 1, 1])
    by_first = torch.tensor([0.1, 0.4, 0.3, 0.9])  # the model fine-tuned on half 0 (rows 0 and 1)
    by_second = torch.tensor([5.0, 1.0, 2.0, 3.0])  # the model fine-tuned on half 1 (rows 2 and 3)
    in_sample = torch.tensor([0.1, 0.4, 2.0, 3.0])
    out_of_sample = torch.tensor([5.0, 1.0, 0.3, 0.9])
    expected = (rank_shares(in_sample) + rank_shares(out_of_sample)) / 2
    assert torch.allclose(in_and_out((by_first, by_second), half), expected)
    # the ranks are taken among the in-sample losses and among the out-of-sample ones, not model by model
    per_model = (rank_shares(by_first) + rank_shares(by_second)) / 2
    assert not torch.allclose(in_and_out((by_first, by_second), half), per_model)
    with pytest.raises(ValueError, match="3 rows' halves"):
        in_and_out((by_first, by_second), half[:3])


def test_pick_rows_takes_whole_rows_from_the_model_of_each_rows_half():
    first, second = torch.zeros(3, 2), torch.ones(3, 2)
    half = torch.tensor([0, 1, 0])
    assert pick_rows((first, second), half).tolist() == [[0, 0], [1, 1], [0, 0]]
    assert pick_rows((first, second), half, in_sample=False).tolist() == [[1, 1], [0, 0], [1, 1]]


def test_crossfit_ranks_every_row_in_and_out_of_sample_and_refines_on_the_rows_kept(cli, tiny_data, tiny_model,
                                                                                    tmp_path):
    out = tmp_path / "post"
    code, text, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--strategy", "crossfit",
                          "--epochs", "2", "--device", "cpu", "--json", "-q")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["strategy"] == "crossfit" and summary["finished"] and "unlearned" not in summary
    assert sorted(p.name for p in out.iterdir()) == CROSSFIT_FILES
    train = pd.read_csv(tiny_data["train"])
    train["id"] = train.path  # its rows' ids (a manifest without ids: their paths), which the halves write out
    folds = [pd.read_csv(out / f"fold{k}.csv") for k in (0, 1)]
    assert sorted(folds[0].id.tolist() + folds[1].id.tolist()) == sorted(train.id.tolist())  # a partition
    for fold in folds:  # stratified: every label's rows split evenly
        assert (fold.label.value_counts() - train.label.value_counts() / 2).abs().max() <= 0.5
    assert [record["rows"] for record in summary["folds"]] == [len(folds[0]), len(folds[1])]
    for k in (0, 1):  # each half model is the input fine-tuned on its half alone
        refined = read_checkpoint(str(out / f"fold{k}.safetensors")).metadata["refined"]
        assert refined["from"]["path"] == tiny_model and refined["manifest"]["rows"] == len(folds[k])

    # the table's score is the mean rank share of each row's loss under both half models, in and out of sample
    losses = []
    for k in (0, 1):
        code, _, err = cli("score", out / f"fold{k}.safetensors", tiny_data["train"], "-o", tmp_path / f"s{k}.csv",
                           "--boundary", "head", "--method", "loss", "--device", "cpu", "-q")
        assert code == 0, err
        losses.append(torch.tensor(pd.read_csv(tmp_path / f"s{k}.csv").set_index("id").loc[train.id, "score"].values))
    half = torch.tensor(train.id.isin(folds[1].id).astype(int).values)
    expected = in_and_out((losses[0], losses[1]), half).numpy()
    scores = pd.read_csv(out / "scores.csv").set_index("id").loc[train.id]
    assert scores["score"].values == pytest.approx(expected)
    sidecar = json.loads((out / "scores.csv.json").read_text())
    assert [Path(c["path"]).name for c in sidecar["inputs"]["checkpoint"]] == ["fold0.safetensors", "fold1.safetensors"]
    assert sidecar["parameters"]["crossfit"]["models"] == ["fold0.safetensors", "fold1.safetensors"]

    # no budget: the share of rows whose label the model that trained on it does not predict
    judgement = summary["judgement"]
    share = float((scores["label"] != scores["predicted"]).mean())
    assert judgement["budget"] == pytest.approx(share) and summary["plan"]["budget_source"] == "estimated"
    kept, removed = pd.read_csv(out / "kept.csv"), pd.read_csv(out / "removed.csv")
    assert len(removed) == judgement["removed"] == round(share * 240) > 0 and len(kept) == 240 - len(removed)
    assert set(removed.id) == set(scores.nsmallest(len(removed), "rank").index)
    final = read_checkpoint(str(out / "final.safetensors")).metadata["refined"]
    assert final["from"]["path"] == tiny_model and final["manifest"]["rows"] == len(kept)
    top = scores.nsmallest(24, "rank")
    assert (top["label"] != top["true_label"]).sum() >= 12  # 24 flips among 240: random ranks would catch 2 or 3


@pytest.mark.parametrize("extra, message", [
    (["--boundary", "refit", "--budget", "0.1"], "--boundary refit does not apply to --strategy crossfit"),
    (["--rounds", "2"], "--rounds applies to --strategy gradual or rejudge; --strategy crossfit has no rounds"),
    (["--patience", "2"], "--patience applies to --strategy gradual or rejudge; crossfit has no rounds"),
])
def test_crossfit_refuses_what_it_cannot_do(cli, tiny_data, tiny_model, tmp_path, extra, message):
    out = tmp_path / "post"
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--strategy", "crossfit",
                       *extra, "--device", "cpu")
    assert code == 3 and message in err and "Traceback" not in err
    assert not out.exists()


def test_crossfit_interrupted_resumes_where_it_stopped(tiny_data, tiny_model, tmp_path, monkeypatch):
    import importlib

    from irank.stages.prune import prune as stage_prune
    from irank.stages.refine import refine as stage_refine
    from irank.workflows import post_train as posttrain

    ranking = importlib.import_module("irank.workflows.post_train.ranking")
    unlearn = importlib.import_module("irank.workflows.post_train.unlearn")

    real_refine, refined = stage_refine, []

    def counting_refine(*args, **kwargs):
        refined.append(Path(kwargs["output"]).name)
        return real_refine(*args, **kwargs)

    def interrupted_prune(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(unlearn, "refine", counting_refine)
    monkeypatch.setattr(ranking, "prune", interrupted_prune)
    out = tmp_path / "post"
    run = dict(out_dir=str(out), loop=LoopOptions(strategy="crossfit", budget=0.1),
               train_options=TrainOptions(scope="head", epochs=1), run_options=RunOptions(device="cpu"))
    with pytest.raises(KeyboardInterrupt):
        posttrain.post_train(tiny_model, tiny_data["train"], **run)
    assert refined == ["fold0.safetensors", "fold1.safetensors"]
    assert len(json.loads((out / "summary.json").read_text())["folds"]) == 2
    monkeypatch.setattr(ranking, "prune", stage_prune)
    result = posttrain.post_train(tiny_model, tiny_data["train"], **run)
    assert refined == ["fold0.safetensors", "fold1.safetensors", "final.safetensors"]  # the halves not again
    assert result.summary["judgement"]["removed"] == 24 and result.summary["finished"]


def test_crossfit_is_refused_under_torchrun(tiny_data, tiny_model, tmp_path, monkeypatch):
    from irank.runtime.errors import UsageError
    from irank.workflows import post_train as posttrain

    monkeypatch.setattr(posttrain, "active", lambda: True)
    with pytest.raises(UsageError, match="--strategy crossfit runs in one process"):
        posttrain.post_train(tiny_model, tiny_data["train"], out_dir=str(tmp_path / "post"),
                             loop=LoopOptions(strategy="crossfit"))
    assert not (tmp_path / "post").exists()


def test_crossfit_with_unreadable_images_skipped_ranks_the_rows_it_read(cli, tiny_data, tiny_model, tmp_path):
    table = pd.read_csv(tiny_data["train"]).head(40)
    folder = Path(tiny_data["folder"])
    (folder / "images" / "broken-crossfit.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    table.loc[3, "path"] = "images/broken-crossfit.png"
    table.loc[30, "path"] = "images/missing-crossfit.png"
    manifest = folder / "crossfit-skip.csv"
    table.to_csv(manifest, index=False)
    out = tmp_path / "post"
    code, _, err = cli("post-train", tiny_model, manifest, "--out-dir", out, "--strategy", "crossfit", "--budget", "0.1",
                       "--epochs", "1", "--scope", "head", "--on-bad-image", "skip", "--device", "cpu", "-q")
    assert code == 0, err
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 38 and not scores.path.str.contains("crossfit").any()
    assert len(pd.read_csv(out / "removed.csv")) == 4
