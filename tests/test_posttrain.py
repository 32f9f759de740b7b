"""post-train: unlearn (the default), the gradual loop and --rejudge; rounds on disk, removal bookkeeping, budget
planning, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from irank.model.checkpoint import read_checkpoint
from irank.options import LoopOptions
from irank.workflows.post_train import plan_rounds


def in_post_train(monkeypatch, name: str, replacement) -> None:
    """Replace the stage `name` (refine, prune) wherever post-train's modules call it."""
    import importlib

    for module in ("ranking", "rounds", "unlearn"):
        loaded = importlib.import_module(f"irank.workflows.post_train.{module}")
        if hasattr(loaded, name):
            monkeypatch.setattr(loaded, name, replacement)

def test_plan_rounds_from_any_two_or_the_estimate():
    assert plan_rounds(LoopOptions(budget=0.3, rounds=6))["step"] == pytest.approx(0.05)
    assert plan_rounds(LoopOptions(step=0.05, rounds=4))["budget"] == pytest.approx(0.2)
    assert plan_rounds(LoopOptions(step=0.1, budget=0.35))["rounds"] == 4
    estimated = plan_rounds(LoopOptions(), estimated_budget=0.2)
    assert estimated["budget_source"] == "estimated" and estimated["rounds"] == 5 and estimated["step"] == pytest.approx(0.04)
    rejudged = plan_rounds(LoopOptions(strategy="rejudge", rounds=4), estimated_budget=0.2)  # the whole budget each round
    assert (rejudged["rounds"], rejudged["step"], rejudged["budget_source"]) == (4, pytest.approx(0.2), "estimated")
    assert plan_rounds(LoopOptions(strategy="rejudge", budget=0.3))["rounds"] == 3


def test_post_train_writes_rounds_and_removes_flips(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    code, out_text, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--rounds", "3",
                              "--step", "0.04", "--val", tiny_data["test"], "--patience", "3", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out_text)
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    for number in (1, 2, 3):
        folder = out / f"round-{number:02d}"
        assert {p.name for p in folder.iterdir()} >= {"scores.csv", "kept.csv", "removed.csv", "model.safetensors"}
    kept = [len(pd.read_csv(out / f"round-{n:02d}" / "kept.csv")) for n in (1, 2, 3)]
    assert kept == [230, 220, 210]  # 4% of the original 240, i.e. 10, per round
    removed = pd.read_csv(out / "removed.csv")
    assert len(removed) == 30 and removed["round"].tolist() == [1] * 10 + [2] * 10 + [3] * 10
    assert removed.groupby("round")["rank"].apply(list).tolist() == [list(range(1, 11))] * 3
    truth = pd.read_csv(tiny_data["train"]).set_index("path")
    flipped_removed = sum(truth.loc[i, "label"] != truth.loc[i, "true_label"] for i in removed["id"])
    assert flipped_removed >= 18  # 24 flips among 240; random removal would catch 3
    assert (out / "final.safetensors").exists()
    assert summary["final_round"] in (1, 2, 3)
    assert all("val_accuracy" in r for r in summary["rounds"])
    assert read_checkpoint(str(out / "final.safetensors")).metadata["classes"]


def test_post_train_resumes_after_the_last_finished_round(tiny_data, tiny_model, tmp_path):
    from irank.options import RunOptions
    from irank.workflows.post_train import post_train

    run = RunOptions(device="cpu")
    full = post_train(tiny_model, tiny_data["train"], out_dir=str(tmp_path / "a"), loop=LoopOptions(rounds=2, step=0.05), run_options=run)
    # Simulate an interruption after round 1: drop round 2 and mark the run unfinished.
    partial = tmp_path / "b"
    post_train(tiny_model, tiny_data["train"], out_dir=str(partial), loop=LoopOptions(rounds=2, step=0.05), run_options=run)
    state = json.loads((partial / "summary.json").read_text())
    state["rounds"] = state["rounds"][:1]
    state.pop("finished")
    (partial / "summary.json").write_text(json.dumps(state))
    import shutil

    shutil.rmtree(partial / "round-02")
    resumed = post_train(tiny_model, tiny_data["train"], out_dir=str(partial), loop=LoopOptions(rounds=2, step=0.05), run_options=run)
    assert [r["round"] for r in resumed.summary["rounds"]] == [1, 2]
    assert (partial / "round-02" / "kept.csv").read_bytes() == (tmp_path / "a" / "round-02" / "kept.csv").read_bytes()
    resumed_weights = read_checkpoint(str(partial / "final.safetensors")).state_dict
    uninterrupted = read_checkpoint(str(tmp_path / "a" / "final.safetensors")).state_dict
    assert all(torch.equal(resumed_weights[k], uninterrupted[k]) for k in uninterrupted)
    assert full.summary["rounds"][1]["kept"] == resumed.summary["rounds"][1]["kept"]


def test_post_train_refuses_a_folder_of_another_run(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    assert cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--rounds", "1", "--step", "0.05", "-q")[0] == 0
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--rounds", "2", "--step", "0.05", "-q")
    assert code == 3 and "another --out-dir" in err


def test_post_train_without_budget_estimates_it(cli, tiny_data, tiny_model, tmp_path):
    code, out_text, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", tmp_path / "p", "--rounds", "2",
                              "--json", "-q")
    assert code == 0, err
    plan = json.loads(out_text)["plan"]
    assert plan["budget_source"] == "estimated" and plan["estimate"]["method"] == "disagreement"
    assert 0 < plan["budget"] < 0.5


def test_post_train_on_a_refit_boundary_cuts_the_model_at_the_chosen_layer(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    code, text, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--rounds", "2", "--step", "0.05",
                          "--boundary", "refit", "--layer", "auto", "--scope", "refit", "--json", "-q")
    assert code == 0, err
    summary = json.loads(text)
    layer = summary["layer_choice"]["layer"]
    assert layer in summary["layer_choice"]["layers"]
    # --method auto (the default) ranks by the probe's loss on a refit boundary, in every round; the summary says so
    rounds = [json.loads((out / f"round-0{n}" / "scores.csv.json").read_text()) for n in (1, 2)]
    assert summary["method"] == "loss" and [r["method"] for r in rounds] == ["loss", "loss"]
    meta = read_checkpoint(str(out / "final.safetensors")).metadata
    if layer == "head-input":
        assert "probe" not in meta
    else:
        assert meta["probe"]["layer"] == layer
    code, text, err = cli("eval", out / "final.safetensors", tiny_data["test"], "--json", "-q")
    assert code == 0 and json.loads(text)["accuracy"] > 0.7


def test_post_train_on_a_refit_boundary_needs_a_budget(cli, tiny_data, tiny_model, tmp_path):
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", tmp_path / "p", "--boundary", "refit")
    assert code == 3 and "--budget" in err
    assert not (tmp_path / "p" / "summary.json").exists()


@pytest.mark.parametrize("later", ["head", "same"])
def test_rejudge_ranks_every_row_each_round_under_the_last_model(tiny_data, tiny_model, tmp_path, monkeypatch, later):
    from irank.options import RunOptions, TrainOptions
    from irank.stages.refine import refine as stage_refine
    from irank.workflows import post_train as posttrain

    started_from = []
    real_refine = stage_refine

    def recording_refine(checkpoint, *args, **kwargs):
        started_from.append(checkpoint)
        return real_refine(checkpoint, *args, **kwargs)

    in_post_train(monkeypatch, "refine", recording_refine)
    out = tmp_path / "post"
    result = posttrain.post_train(tiny_model, tiny_data["train"], out_dir=str(out),
                                  loop=LoopOptions(budget=0.1, strategy="rejudge", boundary="refit", layer="auto",
                                                   rejudge_boundary=later),
                                  train_options=TrainOptions(scope="head", epochs=1), run_options=RunOptions(device="cpu"))
    rounds = result.summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]  # the default for --rejudge
    assert all(r["scored_rows"] == 240 and r["removed"] == 24 and r["kept"] == 216 for r in rounds)
    sidecars = [json.loads((out / f"round-0{n}" / "scores.csv.json").read_text()) for n in (1, 2, 3)]
    # round 1 on a probe of the input; then the refined model's own head (default), or a probe chosen afresh
    kinds = ["refit", "head", "head"] if later == "head" else ["refit"] * 3
    assert [r["boundary"] for r in rounds] == [s["parameters"]["boundary"] for s in sidecars] == kinds
    # --method auto: the probe's loss on a probe, the refined head's own loss on it
    assert [r["method"] for r in rounds] == [s["method"] for s in sidecars] == ["loss"] * 3
    assert all(("layer" in r) == (kind == "refit") for r, kind in zip(rounds, kinds))
    assert all(r["layer"] in result.summary["layer_choice"]["layers"] for r in rounds if "layer" in r)
    scored_by = [sidecar["inputs"]["checkpoint"]["path"] for sidecar in sidecars]
    assert scored_by[0] == tiny_model and [Path(p).parent.name for p in scored_by[1:]] == ["round-01", "round-02"]
    assert started_from == scored_by  # each round refines the model that ranked it
    # the answer: every row judged once more under the final model, as a 4th round would, its top 24 removed
    judged = json.loads((out / "scores.csv.json").read_text())
    assert Path(judged["inputs"]["checkpoint"]["path"]) == out / "final.safetensors"
    assert judged["parameters"]["boundary"] == kinds[-1] == result.summary["judgement"]["boundary"]
    assert result.summary["judgement"]["removed"] == 24 and result.summary["judgement"]["round"] == 3
    assert_top_rows_removed(out)


def assert_top_rows_removed(out: Path, count: int = 24) -> None:
    """DIR/removed.csv is the top `count` of DIR/scores.csv, and DIR/kept.csv the rest of the 240 rows."""
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 240
    removed = pd.read_csv(out / "removed.csv")
    assert sorted(removed["id"]) == sorted(scores.nsmallest(count, "rank")["id"])
    assert len(pd.read_csv(out / "kept.csv")) == 240 - count


@pytest.mark.parametrize("extra, message", [
    (["--rejudge", "--step", "0.05", "--rounds", "2"], "--step does not apply"),
    (["--rejudge", "--boundary", "refit", "--scope", "refit", "--budget", "0.1"], "--scope full or head"),
    (["--rejudge-boundary", "same", "--budget", "0.1"], "--rejudge-boundary applies with --rejudge only"),
    (["--rejudge"], "--rejudge needs --budget"),
    (["--strategy", "unlearn", "--rounds", "2"], "--rounds applies to --strategy gradual or rejudge"),
    (["--strategy", "unlearn", "--step", "0.1"], "--step applies to --strategy gradual or rejudge"),
    (["--rejudge", "--strategy", "gradual", "--budget", "0.1"], "--rejudge is --strategy rejudge"),
    (["--boundary", "refit"], "--boundary refit needs --budget:"),
    (["--val", "val.csv", "--patience", "2"], "--patience applies to --strategy gradual or rejudge"),
])
def test_rejudge_refuses_what_it_cannot_do(cli, tiny_data, tiny_model, tmp_path, extra, message):
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", tmp_path / "p", *extra)
    assert code == 3 and message in err
    assert not (tmp_path / "p" / "summary.json").exists()


def test_rejudge_defaults_to_the_unlearning_recipe_and_given_flags_win(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--rejudge", "--budget", "0.1",
                       "--rounds", "1", "--epochs", "1", "--device", "cpu", "-q")
    assert code == 0, err
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["loop"]["boundary"], config["loop"]["layer"]) == ("refit", "auto")
    train = config["train"]
    assert (train["scope"], train["lr"], train["augment"], train["loss"], train["epochs"]) == ("full", 0.1, "auto", "gce", 1)
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", tmp_path / "plain", "--budget", "0.1",
                       "--rounds", "1", "--device", "cpu", "-q")  # without --rejudge: the gradual loop's defaults
    assert code == 0, err
    config = json.loads((tmp_path / "plain" / "summary.json").read_text())["config"]
    assert (config["loop"]["boundary"], config["loop"]["layer"], config["loop"]["strategy"]) == ("head", None, "gradual")
    assert (config["train"]["scope"], config["train"]["lr"], config["train"]["augment"], config["train"]["loss"],
            config["train"]["epochs"]) == ("refit", 0.01, "none", "ce", 2)


def test_rejudge_with_val_judges_under_the_round_val_chose(tiny_data, tiny_model, tmp_path, monkeypatch):
    from dataclasses import replace

    from irank.options import RunOptions, TrainOptions
    from irank.stages.refine import refine as stage_refine
    from irank.workflows import post_train as posttrain

    real_refine, calls = stage_refine, []

    def refine_whose_first_round_validates_best(*args, **kwargs):
        result = real_refine(*args, **kwargs)
        calls.append(1)
        accuracy = 0.9 if len(calls) == 1 else 0.5
        return replace(result, history=[{**record, "val_accuracy": accuracy} for record in result.history])

    in_post_train(monkeypatch, "refine", refine_whose_first_round_validates_best)
    out = tmp_path / "post"
    result = posttrain.post_train(tiny_model, tiny_data["train"], out_dir=str(out), val=tiny_data["test"],
                                  loop=LoopOptions(rounds=2, budget=0.1, strategy="rejudge", boundary="head", patience=2),
                                  train_options=TrainOptions(scope="head", epochs=1), run_options=RunOptions(device="cpu"))
    assert result.summary["final_round"] == 1 and len(result.summary["rounds"]) == 2
    assert (out / "final.safetensors").read_bytes() == (out / "round-01" / "model.safetensors").read_bytes()
    assert result.summary["judgement"]["round"] == 1
    assert_top_rows_removed(out)


def test_rejudge_interrupted_in_its_judgement_resumes_without_refining_again(tiny_data, tiny_model, tmp_path, monkeypatch):
    from irank.options import RunOptions, TrainOptions
    from irank.stages.prune import prune as stage_prune
    from irank.stages.refine import refine as stage_refine
    from irank.workflows import post_train as posttrain

    real_refine, real_prune, refined = stage_refine, stage_prune, []

    def counting_refine(*args, **kwargs):
        refined.append(1)
        return real_refine(*args, **kwargs)

    def prune_interrupted_in_the_judgement(scores, *args, **kwargs):
        if Path(scores).parent.name == f".{out.name}.judgement.tmp":  # the judgement is built beside DIR
            raise KeyboardInterrupt
        return real_prune(scores, *args, **kwargs)

    in_post_train(monkeypatch, "refine", counting_refine)
    in_post_train(monkeypatch, "prune", prune_interrupted_in_the_judgement)
    out = tmp_path / "post"
    run = dict(out_dir=str(out), loop=LoopOptions(rounds=2, budget=0.1, strategy="rejudge", boundary="head"),
               train_options=TrainOptions(scope="head", epochs=1), run_options=RunOptions(device="cpu"))
    with pytest.raises(KeyboardInterrupt):
        posttrain.post_train(tiny_model, tiny_data["train"], **run)
    assert "judgement" not in json.loads((out / "summary.json").read_text()) and len(refined) == 2
    in_post_train(monkeypatch, "prune", real_prune)
    result = posttrain.post_train(tiny_model, tiny_data["train"], **run)
    assert len(refined) == 2 and result.summary["judgement"]["removed"] == 24
    assert json.loads((out / "summary.json").read_text())["judgement"] == result.summary["judgement"]
    assert_top_rows_removed(out)


UNLEARN_FILES = ["final.safetensors", "kept.csv", "kept.csv.json", "margins.safetensors", "removed.csv", "scores.csv",
                 "scores.csv.json", "summary.json"]


def test_post_train_defaults_to_unlearn_and_ranks_every_row_under_the_fine_tuned_model(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    code, text, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--epochs", "3",
                          "--device", "cpu", "--json", "-q")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["strategy"] == summary["config"]["loop"]["strategy"] == "unlearn" and "rounds" not in summary
    assert sorted(p.name for p in out.iterdir()) == UNLEARN_FILES
    train = summary["config"]["train"]
    assert (train["scope"], train["lr"], train["augment"], train["loss"], train["epochs"]) == ("full", 0.1, "auto", "gce", 3)
    refined = read_checkpoint(str(out / "final.safetensors")).metadata["refined"]  # one fine-tune of the input, every row
    assert refined["from"]["path"] == tiny_model and refined["manifest"]["rows"] == 240
    assert [r["epoch"] for r in refined["history"]] == [1, 2, 3]
    sidecar = json.loads((out / "scores.csv.json").read_text())
    assert Path(sidecar["inputs"]["checkpoint"]["path"]) == out / "final.safetensors"
    # --method auto: the fine-tune's area under the margin and the final model's loss, their ranks averaged
    assert (sidecar["parameters"]["boundary"], sidecar["method"]) == ("head", "aum-loss")
    scores = pd.read_csv(out / "scores.csv").set_index("path")
    area = pd.Series(load_file(str(out / "margins.safetensors"))["area_under_margin"].numpy(),
                     index=pd.read_csv(tiny_data["train"])["path"])  # manifest order
    assert area.std() > 0
    expected = ((-area).rank() + scores["loss"].reindex(area.index).rank()) / 2 / len(area)
    assert scores["score"].reindex(area.index).to_numpy() == pytest.approx(expected.to_numpy())
    scores = scores.reset_index()
    # no budget: the share of rows whose label the fine-tuned model does not predict
    share = float((scores["label"] != scores["predicted"]).mean())
    judgement = summary["judgement"]
    assert judgement["budget"] == pytest.approx(share) and summary["plan"]["budget_source"] == "estimated"
    assert judgement["removed"] == round(share * 240) > 0
    assert_top_rows_removed(out, judgement["removed"])
    top = scores.nsmallest(24, "rank")
    assert (top["label"] != top["true_label"]).sum() >= 12  # 24 flips among 240: random ranks would catch 2 or 3


def test_unlearn_with_a_budget_and_val(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    code, text, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--budget", "0.1",
                          "--epochs", "2", "--val", tiny_data["test"], "--device", "cpu", "--json", "-q")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["judgement"]["removed"] == 24 and summary["plan"] == {"budget": 0.1, "budget_source": "--budget"}
    assert_top_rows_removed(out)
    history = read_checkpoint(str(out / "final.safetensors")).metadata["refined"]["history"]
    assert summary["unlearned"]["val_accuracy"] == max(r["val_accuracy"] for r in history)
    assert 0 < summary["input_val_accuracy"] <= 1


@pytest.mark.parametrize("budget", [[], ["--budget", "0.1"]])
def test_unlearn_says_when_its_budget_was_estimated(cli, tiny_data, tiny_model, tmp_path, budget):
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", tmp_path / "post", "--epochs", "1",
                       "--device", "cpu", *budget)
    assert code == 0, err
    said = " ".join(err.split())  # the terminal's line breaks undone
    assert ("removed 24 (10.0%, --budget) into" if budget else "estimated) into") in said
    assert ("give --budget if you know your noise rate" in said) == (not budget)


@pytest.mark.parametrize("strategy", ["unlearn", "crossfit"])
def test_unlearn_warns_when_the_fine_tune_validates_below_the_input(tiny_data, tiny_model, tmp_path, monkeypatch,
                                                                    strategy):
    from dataclasses import replace

    from irank.options import RunOptions, TrainOptions
    from irank.runtime.progress import Reporter
    from irank.stages.refine import refine as stage_refine
    from irank.workflows import post_train as posttrain

    real_refine, warnings = stage_refine, []

    def refine_that_validates_at_zero(*args, **kwargs):
        result = real_refine(*args, **kwargs)
        return replace(result, history=[{**record, "val_accuracy": 0.0} for record in result.history])

    class Recording(Reporter):
        def warn(self, message: str) -> None:
            warnings.append(message)

    in_post_train(monkeypatch, "refine", refine_that_validates_at_zero)
    result = posttrain.post_train(tiny_model, tiny_data["train"], out_dir=str(tmp_path / "post"), val=tiny_data["test"],
                                  loop=LoopOptions(strategy=strategy, budget=0.1),
                                  train_options=TrainOptions(scope="head", epochs=1),
                                  run_options=RunOptions(device="cpu"), reporter=Recording())
    summary = result.summary  # each fine-tune's record keeps its best epoch's accuracy on --val
    fine_tunes = [summary["unlearned"]] if strategy == "unlearn" else [*summary["folds"], summary["refined"]]
    assert [record["val_accuracy"] for record in fine_tunes] == [0.0] * len(fine_tunes)
    assert 0 < summary["input_val_accuracy"] <= 1
    assert len(warnings) == 1 and "did not beat the input checkpoint" in warnings[0]


def stop_after_saving(monkeypatch, saves: int) -> list[int]:
    """Make training stop (Ctrl-C) right after its `saves`-th resume state is saved; returns the list of the epochs
    saved, which grows as training goes on."""
    from irank.formats.resume import Resume

    real_save, epochs_done = Resume.save, []

    def save_then_maybe_stop(self, state):
        real_save(self, state)
        epochs_done.append(state.info["epoch"])
        if len(epochs_done) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(Resume, "save", save_then_maybe_stop)
    return epochs_done


def test_unlearn_interrupted_in_its_fine_tune_resumes_from_the_last_epoch(tiny_data, tiny_model, tmp_path, monkeypatch):
    from irank.options import RunOptions, TrainOptions
    from irank.workflows import post_train as posttrain

    run = dict(loop=LoopOptions(budget=0.1), train_options=TrainOptions(scope="full", epochs=3, lr=0.1, loss="gce"),
               run_options=RunOptions(device="cpu", batch_size=64))
    posttrain.post_train(tiny_model, tiny_data["train"], out_dir=str(tmp_path / "whole"), **run)
    epochs_done = stop_after_saving(monkeypatch, 2)
    out = tmp_path / "post"
    with pytest.raises(KeyboardInterrupt):
        posttrain.post_train(tiny_model, tiny_data["train"], out_dir=str(out), **run)
    assert sorted(p.name for p in out.iterdir()) == ["final.safetensors.resume", "summary.json"]
    result = posttrain.post_train(tiny_model, tiny_data["train"], out_dir=str(out), **run)
    assert epochs_done == [1, 2, 3]  # the resumed run trained the third epoch only
    assert sorted(p.name for p in out.iterdir()) == UNLEARN_FILES
    resumed = read_checkpoint(str(out / "final.safetensors")).state_dict
    whole = read_checkpoint(str(tmp_path / "whole" / "final.safetensors")).state_dict
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert result.summary["judgement"]["removed"] == 24
    assert (out / "removed.csv").read_bytes() == (tmp_path / "whole" / "removed.csv").read_bytes()


def stop_unlearn_in_its_judgement(monkeypatch, model, manifest: str, out) -> dict:
    """Run unlearn (the head fine-tuned one epoch, --budget 0.1) into `out` until its judgement prunes, stopped
    there as Ctrl-C would; prune is restored and the keywords that run it again returned."""
    from irank.options import RunOptions, TrainOptions
    from irank.stages.prune import prune as real_prune
    from irank.workflows import post_train as posttrain

    def interrupted_prune(*args, **kwargs):
        raise KeyboardInterrupt

    in_post_train(monkeypatch, "prune", interrupted_prune)
    run = dict(out_dir=str(out), loop=LoopOptions(budget=0.1), train_options=TrainOptions(scope="head", epochs=1),
               run_options=RunOptions(device="cpu"))
    with pytest.raises(KeyboardInterrupt):
        posttrain.post_train(model, manifest, **run)
    in_post_train(monkeypatch, "prune", real_prune)
    return run


def test_unlearn_interrupted_in_its_judgement_resumes_without_fine_tuning_again(tiny_data, tiny_model, tmp_path, monkeypatch):
    from irank.stages.refine import refine as stage_refine
    from irank.workflows import post_train as posttrain

    real_refine, refined = stage_refine, []

    def counting_refine(*args, **kwargs):
        refined.append(1)
        return real_refine(*args, **kwargs)

    in_post_train(monkeypatch, "refine", counting_refine)
    out = tmp_path / "post"
    run = stop_unlearn_in_its_judgement(monkeypatch, tiny_model, tiny_data["train"], out)
    assert "unlearned" in json.loads((out / "summary.json").read_text()) and len(refined) == 1
    result = posttrain.post_train(tiny_model, tiny_data["train"], **run)
    assert len(refined) == 1 and result.summary["judgement"]["removed"] == 24
    assert_top_rows_removed(out)


def test_unlearn_resuming_a_fine_tune_without_margins_judges_by_the_loss(tiny_data, tiny_model, tmp_path, monkeypatch):
    from irank.runtime.progress import Reporter
    from irank.workflows import post_train as posttrain

    class Warnings(Reporter):
        def __init__(self):
            super().__init__()
            self.said = []

        def warn(self, message: str) -> None:
            self.said.append(message)

    out = tmp_path / "post"
    run = stop_unlearn_in_its_judgement(monkeypatch, tiny_model, tiny_data["train"], out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unlearned"]["margins"] == "margins.safetensors"
    del summary["unlearned"]["margins"]  # as an irank before the margins left it
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "margins.safetensors").unlink()
    reporter = Warnings()
    result = posttrain.post_train(tiny_model, tiny_data["train"], reporter=reporter, **run)
    assert result.summary["judgement"]["method"] == "loss" and result.summary["judgement"]["removed"] == 24
    assert any("without its margins" in message for message in reporter.said)


def test_unlearn_resumed_with_another_batch_size_starts_its_fine_tune_afresh(tiny_data, tiny_model, tmp_path, monkeypatch):
    from irank.options import RunOptions, TrainOptions
    from irank.workflows import post_train as posttrain

    epochs_done = stop_after_saving(monkeypatch, 1)
    out = tmp_path / "post"
    run = dict(out_dir=str(out), loop=LoopOptions(budget=0.1), train_options=TrainOptions(scope="full", epochs=2))
    with pytest.raises(KeyboardInterrupt):
        posttrain.post_train(tiny_model, tiny_data["train"], run_options=RunOptions(device="cpu", batch_size=64), **run)
    result = posttrain.post_train(tiny_model, tiny_data["train"], run_options=RunOptions(device="cpu", batch_size=32), **run)
    assert epochs_done == [1, 1, 2]  # the state saved with batches of 64 does not continue a run with 32
    assert result.summary["judgement"]["removed"] == 24 and not (out / "final.safetensors.resume").exists()


def test_unlearn_with_a_refit_head_has_no_margins_and_judges_by_the_loss(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    code, text, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--scope", "refit",
                          "--budget", "0.1", "--device", "cpu", "--json")
    assert code == 0, err
    summary = json.loads(text)
    assert summary["judgement"]["method"] == "loss" and "margins" not in summary["unlearned"]
    assert not (out / "margins.safetensors").exists() and "without its margins" not in err
