"""End to end through the CLI on a tiny generated image set with a tiny model trained in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from irank.core.metrics import auroc
from irank.model.checkpoint import read_checkpoint

CLASSES = ["cross", "disk", "hstripes", "vstripes"]  # sorted unique labels: how `irank train` names classes
SCORE_COLUMNS = ["rank", "id", "path", "label", "predicted", "label_prob", "predicted_prob", "loss", "score", "class_rank",
                 "candidate_2", "candidate_2_prob", "candidate_3", "candidate_3_prob"]


@pytest.fixture(scope="module")
def scored(tiny_data, tiny_model, tmp_path_factory):
    import irank
    from irank.cli import main  # noqa: F401  (import check)

    output = str(tmp_path_factory.mktemp("scores") / "scores.csv")
    irank.score(tiny_model, tiny_data["train"], output=output, run_options=irank.RunOptions(device="cpu"))
    return output


def test_score_cli_writes_ranked_table_and_sidecar(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "scores.csv"
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu")
    assert code == 0, err
    table = pd.read_csv(output)
    assert list(table.columns[: len(SCORE_COLUMNS)]) == SCORE_COLUMNS
    assert "true_label" in table.columns  # the manifest's own columns survive
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    assert (np.diff(table["score"].to_numpy()) <= 0).all()
    for _label, group in table.groupby("label"):
        assert sorted(group["class_rank"]) == list(range(1, len(group) + 1))
        assert (np.diff(group.sort_values("class_rank")["score"].to_numpy()) <= 0).all()
    sidecar = json.loads((tmp_path / "scores.csv.json").read_text())
    assert sidecar["method"] == "joint-loss"  # --method auto on the default refit probe
    assert sidecar["classes"] == CLASSES
    assert len(sidecar["inputs"]["checkpoint"]["sha256"]) == 64
    assert sidecar["num_samples"] == len(table) == 240


def test_flipped_labels_rank_at_the_top(scored):
    table = pd.read_csv(scored)
    flipped = (table["label"] != table["true_label"]).to_numpy()
    assert flipped.sum() == 24
    assert auroc(table["score"].to_numpy(), flipped) >= 0.9
    assert flipped[:24].mean() >= 0.6  # precision at k


@pytest.mark.parametrize("method", ["loss", "margin", "gradnorm"])
def test_baseline_methods_also_find_flips(cli, tiny_data, tiny_model, tmp_path, method):
    output = tmp_path / "scores.csv"
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--method", method, "--device", "cpu", "-q")
    assert code == 0, err
    table = pd.read_csv(output)
    assert auroc(table["score"].to_numpy(), (table["label"] != table["true_label"]).to_numpy()) >= 0.85


def test_every_influence_variant_computes_its_own_scores(cli, tiny_data, tiny_model, tmp_path):
    """Each measure × curvature on the head: the sidecar says which, and each gives its own scores (the
    curvatures rank alike, but are not the same numbers; the measures differ)."""
    scores = {}
    for measure in ("self-influence", "boundary-shift", "parameter-shift"):
        for curvature in ("exact", "kfac"):
            output = tmp_path / f"{measure}-{curvature}.csv"
            code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--influence-measure", measure,
                               "--curvature", curvature, "--boundary", "head", "--device", "cpu", "-q")
            assert code == 0, err
            parameters = json.loads(Path(f"{output}.json").read_text())["parameters"]
            assert (parameters["influence_measure"], parameters["curvature"]) == (measure, curvature)
            scores[measure, curvature] = pd.read_csv(output).set_index("id")["score"].sort_index().to_numpy()
    for measure in ("self-influence", "boundary-shift", "parameter-shift"):
        exact, kfac = scores[measure, "exact"], scores[measure, "kfac"]
        assert not np.allclose(exact, kfac, rtol=1e-3)
        assert np.corrcoef(exact.argsort().argsort(), kfac.argsort().argsort())[0, 1] >= 0.8
    for curvature in ("exact", "kfac"):
        measures = [scores[measure, curvature] for measure in ("self-influence", "boundary-shift", "parameter-shift")]
        assert not any(np.allclose(a, b, rtol=1e-3) for i, a in enumerate(measures) for b in measures[i + 1:])


def test_prune_keeps_exactly_the_right_rows(cli, scored, tiny_data, tmp_path):
    clean, removed = tmp_path / "clean.csv", tmp_path / "removed.csv"
    code, _, err = cli("prune", scored, tiny_data["train"], "--fraction", "0.1", "-o", clean, "--removed", removed)
    assert code == 0, err
    scores = pd.read_csv(scored)
    manifest = pd.read_csv(tiny_data["train"])
    expected_removed = set(scores[scores["rank"] <= 24]["id"])
    kept = pd.read_csv(clean)
    # Written to another folder: paths are rebased and the original paths kept as ids.
    assert list(kept.columns) == ["id"] + list(manifest.columns)
    assert kept["id"].tolist() == [p for p in manifest["path"] if p not in expected_removed]  # order kept
    assert all((tmp_path / p).exists() for p in kept["path"])
    gone = pd.read_csv(removed)
    assert set(gone["id"]) == expected_removed and gone["rank"].tolist() == list(range(1, 25))


def test_prune_beside_the_manifest_keeps_its_columns_exactly(cli, scored, tiny_data):
    folder = os.path.dirname(tiny_data["train"])
    clean = os.path.join(folder, "clean-same-folder.csv")
    code, _, err = cli("prune", scored, tiny_data["train"], "--count", "10", "-o", clean)
    assert code == 0, err
    manifest = pd.read_csv(tiny_data["train"])
    kept = pd.read_csv(clean)
    top = set(pd.read_csv(scored)["id"][:10])
    pd.testing.assert_frame_equal(kept, manifest[~manifest["path"].isin(top)].reset_index(drop=True))


def test_prune_per_class_takes_from_each_class(cli, scored, tiny_data, tmp_path):
    clean = tmp_path / "clean.csv"
    code, _, err = cli("prune", scored, tiny_data["train"], "--fraction", "0.25", "--per-class", "-o", clean)
    assert code == 0, err
    scores = pd.read_csv(scored)
    kept_ids = set(pd.read_csv(clean)["id"])
    for _label, group in scores.groupby("label"):
        expected = int(round(0.25 * len(group)))
        assert (~group["id"].isin(kept_ids)).sum() == expected
        assert set(group[group["class_rank"] <= expected]["id"]).isdisjoint(kept_ids)


def test_prune_min_per_class_never_empties_a_class(cli, scored, tiny_data, tmp_path):
    clean = tmp_path / "clean.csv"
    code, _, err = cli("prune", scored, tiny_data["train"], "--count", "239", "--min-per-class", "5", "-o", clean)
    assert code == 0, err
    assert pd.read_csv(clean)["label"].value_counts().min() >= 5


def test_refine_then_score_and_eval_need_no_flags(cli, tiny_data, tiny_model, tmp_path):
    refined = tmp_path / "refined.safetensors"
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", refined, "--scope", "full", "--epochs", "1",
                       "--device", "cpu", "--val", tiny_data["test"], "-q")
    assert code == 0, err
    meta = read_checkpoint(str(refined)).metadata
    assert meta["arch"] == "tiny-cnn" and meta["head"] == "fc" and meta["classes"] == CLASSES
    assert meta["refined"]["best_epoch"] == 1 and "val_accuracy" in meta["refined"]["history"][0]
    code, _, err = cli("score", refined, tiny_data["train"], "-o", tmp_path / "s.csv", "-q")
    assert code == 0, err
    code, out, err = cli("eval", refined, tiny_data["test"], "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    expected = independent_accuracy(str(refined), tiny_data["test"])
    assert report["accuracy"] == pytest.approx(expected["all"], abs=1e-6) and report["num_samples"] == 80
    for name, row in report["per_class"].items():
        assert row["accuracy"] == pytest.approx(expected[name], abs=1e-6)


def independent_accuracy(checkpoint: str, manifest: str) -> dict[str, float]:
    """Accuracy computed here without irank's loaders or forward pass: PIL, the checkpoint's normalization, the
    model called on one image at a time."""
    import torch
    from PIL import Image

    from irank.model.checkpoint import build_model, load_weights

    loaded = read_checkpoint(checkpoint)
    meta = loaded.metadata
    model = build_model(meta["arch"], len(meta["classes"]))
    load_weights(model, loaded, meta["arch"])
    model.eval()
    mean = torch.tensor(meta["preprocess"]["mean"])[:, None, None]
    std = torch.tensor(meta["preprocess"]["std"])[:, None, None]
    table = pd.read_csv(manifest)
    hits = {name: [] for name in meta["classes"]}
    for path, label in zip(table["path"], table["label"]):
        pixels = np.asarray(Image.open(Path(manifest).parent / path).convert("RGB"), dtype=np.float32) / 255
        image = (torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std
        with torch.no_grad():
            predicted = meta["classes"][int(model(image[None]).argmax())]
        hits[label].append(predicted == label)
    every = [hit for values in hits.values() for hit in values]
    return {"all": float(np.mean(every)), **{name: float(np.mean(values)) for name, values in hits.items() if values}}


def test_refine_head_keeps_the_backbone(tiny_data, tiny_model, tmp_path):
    import irank

    refined = str(tmp_path / "refined.safetensors")
    irank.refine(tiny_model, tiny_data["train"], output=refined, train_options=irank.TrainOptions(scope="head", epochs=2),
                 run_options=irank.RunOptions(device="cpu"))
    before, after = read_checkpoint(tiny_model).state_dict, read_checkpoint(refined).state_dict
    assert all(np.array_equal(before[k], after[k]) for k in before if not k.startswith("fc."))
    assert not np.array_equal(before["fc.weight"], after["fc.weight"])


def test_pipeline_through_stdin(tiny_data, tiny_model, tmp_path):
    python = sys.executable
    command = (
        f"{python} -m irank score {tiny_model} {tiny_data['train']} -o - -q --device cpu | "
        f"{python} -m irank prune - {tiny_data['train']} --fraction 0.1 -o {tmp_path / 'clean.csv'} -q"
    )
    completed = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    kept = pd.read_csv(tmp_path / "clean.csv")
    assert len(kept) == 216
    assert "id" in kept.columns  # paths were rebased to the new folder; ids stay the original paths
    assert all((tmp_path / p).exists() for p in kept["path"])


def test_manifest_from_image_folder(cli, tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / name / f"{i}.png")
    code, _, err = cli("manifest", tmp_path / "imgs", "-o", tmp_path / "m.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "m.csv")
    assert table["label"].tolist() == ["cat"] * 3 + ["dog"] * 3
    assert table["path"][0] == "imgs/cat/0.png"


def test_pt_state_dict_with_arch_flag(cli, tiny_data, tiny_model, tmp_path):
    import torch

    state = {k: v for k, v in read_checkpoint(tiny_model).state_dict.items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "model.pt")
    code, _, err = cli("score", tmp_path / "model.pt", tiny_data["train"], "-o", tmp_path / "s.csv",
                       "--arch", "tiny-cnn", "-q")
    assert code == 0, err
    assert "classes from the sorted unique labels" not in err  # quiet
    sidecar = json.loads((tmp_path / "s.csv.json").read_text())
    assert sidecar["class_source"] == "the sorted unique labels of the manifest"
    assert sidecar["classes"] == CLASSES


def test_demo_runs_and_catches_flipped_labels(cli, tmp_path):
    code, out, err = cli("demo", tmp_path / "demo", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    folder = tmp_path / "demo"
    truth = pd.read_csv(folder / "data" / "train.csv")
    flipped = set(truth.loc[truth["label"] != truth["true_label"], "path"])
    removed = pd.read_csv(folder / "removed.csv")
    assert len(flipped) == summary["flipped_labels"] == 375 and len(removed) == summary["removed"]
    caught = sum(identifier in flipped for identifier in removed["id"])  # recounted from the files it wrote
    assert caught == summary["flipped_among_removed"] and caught / len(removed) == summary["precision_at_k"]
    assert summary["precision_at_k"] > 0.5  # random removal would catch 25%
    scores = pd.read_csv(folder / "scores.csv")
    assert summary["auroc"] == pytest.approx(auroc(scores["score"].to_numpy(), scores["id"].isin(flipped).to_numpy()))
    kept = pd.read_csv(folder / "clean.csv")
    assert len(kept) + len(removed) == 1500 and not set(kept["id"]) & set(removed["id"])
    after = independent_accuracy(str(folder / "refined.safetensors"), str(folder / "data" / "test.csv"))["all"]
    assert summary["test_accuracy_after"] == pytest.approx(after, abs=1e-6)


def test_same_inputs_give_the_same_bytes(tiny_data, tmp_path):
    import irank

    options = irank.TrainOptions(scope="full", epochs=1, lr=0.05, seed=7)
    run = irank.RunOptions(device="cpu", batch_size=32)
    for name in ("a", "b"):
        irank.train("tiny-cnn", tiny_data["train"], output=str(tmp_path / f"{name}.safetensors"), train_options=options, run_options=run)
        irank.score(str(tmp_path / f"{name}.safetensors"), tiny_data["train"], output=str(tmp_path / f"{name}.csv"), run_options=run)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_refine_refit_replaces_only_the_head_with_a_convex_fit(cli, tiny_data, tiny_model, tmp_path):
    refined = tmp_path / "refit.safetensors"
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", refined, "--scope", "refit", "--l2", "0.01",
                       "--val", tiny_data["test"], "-q")
    assert code == 0, err
    before, after = read_checkpoint(tiny_model).state_dict, read_checkpoint(str(refined)).state_dict
    assert all(np.array_equal(before[k], after[k]) for k in before if not k.startswith("fc."))
    assert not np.array_equal(before["fc.weight"], after["fc.weight"])
    history = read_checkpoint(str(refined)).metadata["refined"]["history"]
    assert history[0]["val_accuracy"] > 0.7


def test_train_with_generalized_cross_entropy(cli, tiny_data, tmp_path):
    """--loss gce trains otherwise than ce from the same seed, and the loss it records is GCE's: bounded by 1/q,
    where the cross-entropy of the same start is not."""
    histories, weights = {}, {}
    for loss in ("ce", "gce"):
        out = tmp_path / f"{loss}.safetensors"
        code, _, err = cli("train", "tiny-cnn", tiny_data["train"], "-o", out, "--epochs", "2", "--loss", loss, "-q")
        assert code == 0, err
        checkpoint = read_checkpoint(str(out))
        assert checkpoint.metadata["trained"]["options"]["loss"] == loss
        histories[loss] = [epoch["train_loss"] for epoch in checkpoint.metadata["trained"]["history"]]
        weights[loss] = checkpoint.state_dict["fc.weight"]
    assert not np.allclose(weights["ce"], weights["gce"])
    assert all(0 < value < 1 / 0.7 for value in histories["gce"])
    assert histories["gce"][0] < histories["ce"][0]  # (1 − p^q)/q < −log p for every p in (0, 1)
    code, _, err = cli("train", "tiny-cnn", tiny_data["train"], "-o", out, "--loss", "mse", "-q")
    assert code == 2 and "'mse' is not one of 'ce', 'gce'" in err  # a value not among the choices: the command line's


def test_refine_with_generalized_cross_entropy(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "refined.safetensors"
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", out, "--epochs", "1", "--loss", "gce", "-q")
    assert code == 0, err
    assert read_checkpoint(str(out)).metadata["refined"]["options"]["loss"] == "gce"


def test_gce_loss_matches_its_formula():
    import torch

    from irank.model.training import training_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    probs = torch.softmax(logits, 1)[:, 0]
    assert torch.allclose(training_loss(logits, labels, "gce"), ((1 - probs**0.7) / 0.7).mean())


def test_a_parquet_manifest_goes_through_score_prune_and_apply(cli, tiny_data, tiny_model, tmp_path):
    """Parquet in, Parquet out: the rows, their order, every column and its type kept (pyarrow: the test extra)."""
    pytest.importorskip("pyarrow")
    table = pd.read_csv(tiny_data["train"])
    table["path"] = [str(Path(tiny_data["folder"]) / p) for p in table["path"]]
    table["weight"] = np.linspace(0.5, 1.5, len(table))  # a float column of the user's own
    table["batch"] = np.arange(len(table)) % 3  # and an integer one
    manifest = tmp_path / "train.parquet"
    table.to_parquet(manifest, index=False)
    scores, kept = tmp_path / "s.csv", tmp_path / "kept.parquet"
    assert cli("score", tiny_model, manifest, "-o", scores, "--allow-outside-root", "--device", "cpu", "-q")[0] == 0
    code, _, err = cli("prune", scores, manifest, "--count", "24", "-o", kept, "-q")
    assert code == 0, err
    removed_ids = set(pd.read_csv(scores).sort_values("rank")["id"].head(24))
    expected = table[~table["path"].isin(removed_ids)].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_parquet(kept), expected)
    reviewed = tmp_path / "review.csv"
    pd.DataFrame({"id": [expected["path"][0]], "decision": ["relabel"], "new_label": ["cross"]}).to_csv(reviewed,
                                                                                                     index=False)
    fixed = tmp_path / "fixed.parquet"
    code, _, err = cli("apply", reviewed, kept, "-o", fixed, "-q")
    assert code == 0, err
    expected.loc[0, "label"] = "cross"
    pd.testing.assert_frame_equal(pd.read_parquet(fixed), expected)
