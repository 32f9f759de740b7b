"""Tensor rows: manifests whose rows point into .npy / .safetensors files, end to end through the CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from test_errors import assert_clean_failure

from irank.core.metrics import auroc
from irank.formats import synthetic
from irank.formats.manifest import read_manifest
from irank.formats.tensor_rows import TensorDataset, check_tensor_rows
from irank.model.checkpoint import build_model, read_checkpoint
from irank.runtime.errors import CheckpointError

DIM = 16
ARCH = f"mlp-{DIM}-64"


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> dict:
    """400 training rows of 16 values in 4 Gaussian classes (15% flipped) and 200 clean test rows, as .npy."""
    folder = tmp_path_factory.mktemp("embeddings")
    train_csv, test_csv = synthetic.make_embeddings(folder, num_rows=400, dim=DIM, num_classes=4, noise=0.15,
                                                    test_rows=200, seed=0)
    return {"folder": folder, "train": train_csv, "test": test_csv, "values": np.load(folder / "train.npy")}


@pytest.fixture(scope="module")
def mlp_model(embeddings, tmp_path_factory) -> Path:
    """mlp-16-64 trained through the CLI until it fits the flipped labels too."""
    import irank
    from irank.cli import main  # noqa: F401

    output = tmp_path_factory.mktemp("mlp") / "model.safetensors"
    irank.train(ARCH, str(embeddings["train"]), output=str(output),
                train_options=irank.TrainOptions(scope="full", epochs=40, lr=0.05, seed=0),
                run_options=irank.RunOptions(device="cpu", batch_size=32))
    return output


def flipped_mask(table: pd.DataFrame) -> np.ndarray:
    return table["flipped"].astype(int).to_numpy() == 1


def test_make_embeddings_writes_float32_rows_and_flips(tmp_path):
    train_csv, test_csv = synthetic.make_embeddings(tmp_path, num_rows=101, dim=5, num_classes=3, noise=0.2, seed=4)
    assert test_csv is None and not (tmp_path / "test.csv").exists()
    values = np.load(tmp_path / "train.npy")
    assert values.dtype == np.float32 and values.shape == (101, 5)
    table = pd.read_csv(train_csv)
    assert list(table.columns) == ["path", "label", "index", "true_label", "flipped"]
    assert table["index"].tolist() == list(range(101)) and set(table["path"]) == {"train.npy"}
    assert (table["flipped"] == (table["label"] != table["true_label"])).all()
    assert table["flipped"].sum() == round(0.2 * 101)
    # Separable: every row is nearer its own class's mean than any other's.
    means = {name: values[(table["true_label"] == name).to_numpy()].mean(0) for name in sorted(set(table["true_label"]))}
    nearest = [min(means, key=lambda name: np.linalg.norm(row - means[name])) for row in values]
    assert np.mean(np.array(nearest) == table["true_label"].to_numpy()) >= 0.95


def test_train_score_prune_refine_eval_through_the_cli(cli, embeddings, mlp_model, tmp_path):
    meta = read_checkpoint(str(mlp_model)).metadata
    assert meta["arch"] == ARCH and meta["head"] == "fc" and meta["input_shape"] == [DIM]

    scores = tmp_path / "scores.csv"
    code, _, err = cli("score", mlp_model, embeddings["train"], "-o", scores, "--device", "cpu")
    assert code == 0, err
    table = pd.read_csv(scores)
    assert len(table) == 400
    assert table["id"].iloc[0] == f"train.npy[{table['index'].iloc[0]}]"  # default id: path[index]
    assert (table["path"] == "train.npy").all() and sorted(table["index"]) == list(range(400))
    flipped = flipped_mask(table)
    assert auroc(table["score"].to_numpy(), flipped) >= 0.95  # measured 0.988 to 0.992 over three seeds
    assert flipped[: flipped.sum()].mean() >= 0.7  # precision at k; measured 0.87 to 0.92

    clean, removed = tmp_path / "out" / "clean.csv", tmp_path / "out" / "removed.csv"
    code, _, err = cli("prune", scores, embeddings["train"], "--fraction", "0.15", "-o", clean, "--removed", removed)
    assert code == 0, err
    kept = pd.read_csv(clean)
    assert len(kept) == 340 and kept["path"].nunique() == 1  # rebased into out/: still the same file
    assert (clean.parent / kept["path"].iloc[0]).resolve() == (embeddings["folder"] / "train.npy").resolve()
    assert kept["id"].str.fullmatch(r"train\.npy\[\d+\]").all()  # ids kept stable
    assert flipped_mask(pd.read_csv(removed)).mean() >= 0.7

    refined = tmp_path / "refined.safetensors"
    code, _, err = cli("refine", mlp_model, clean, "-o", refined, "--scope", "full", "--epochs", "3", "--lr", "0.02",
                       "--device", "cpu", "--allow-outside-root")
    assert code == 0, err
    assert read_checkpoint(str(refined)).metadata["arch"] == ARCH
    code, out, err = cli("eval", refined, embeddings["test"], "--json", "--device", "cpu")  # no flags needed
    assert code == 0, err
    report = json.loads(out)
    assert report["num_samples"] == 200 and report["accuracy"] >= 0.7


def test_refit_scope_and_probe_layer_on_the_mlp(cli, embeddings, mlp_model, tmp_path):
    refined = tmp_path / "probe.safetensors"
    code, _, err = cli("refine", mlp_model, embeddings["train"], "-o", refined, "--scope", "refit", "--layer", "input",
                       "--device", "cpu")
    assert code == 0, err
    code, out, err = cli("eval", refined, embeddings["test"], "--json", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["accuracy"] >= 0.9  # a linear probe on the clean-structured input ignores most flips


def test_layers_lists_the_hidden_layer(cli, mlp_model):
    code, out, err = cli("layers", mlp_model, "--json")
    assert code == 0, err
    layers = {row["name"]: row for row in json.loads(out)["layers"]}
    assert layers["hidden1"]["shape"] == [64] and layers["hidden1"]["pooled"] == 64 and layers["hidden1"]["candidate"]
    assert layers["input"]["shape"] == [DIM] and layers["input"]["candidate"]
    assert not layers["fc"]["candidate"]


def test_linear_arch_trains_and_scores(cli, embeddings, tmp_path):
    model = tmp_path / "linear.safetensors"
    code, _, err = cli("train", f"linear-{DIM}", embeddings["train"], "-o", model, "--epochs", "3", "--device", "cpu")
    assert code == 0, err
    assert set(read_checkpoint(str(model)).state_dict) == {"fc.weight", "fc.bias"}
    scores = tmp_path / "s.csv"
    code, _, err = cli("score", model, embeddings["train"], "-o", scores, "--device", "cpu")
    assert code == 0, err
    table = pd.read_csv(scores)
    assert auroc(table["score"].to_numpy(), flipped_mask(table)) >= 0.9


@pytest.mark.parametrize("arch, needle", [("mlp-0", "positive whole numbers"), ("mlp-16-x", "positive whole numbers"),
                                          ("linear-16-8", "one width")])
def test_bad_vector_arch_names(arch, needle):
    with pytest.raises(CheckpointError, match=needle):
        build_model(arch, 3)


def test_mlp_refuses_an_image_manifest(cli, tiny_data, tmp_path):
    out = tmp_path / "m.safetensors"
    assert_clean_failure(cli("train", ARCH, tiny_data["train"], "-o", out, "--epochs", "1"),
                         ARCH, "reads tensor rows", output=out)


def write_safetensors(folder: Path, values: np.ndarray, *, extra: bool) -> Path:
    tensors = {"embeddings": values}
    if extra:
        tensors["other"] = np.zeros((3, 2), dtype=np.float32)
    path = folder / ("several.safetensors" if extra else "one.safetensors")
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("layout", ["single tensor", "key column"])
def test_safetensors_rows_score_like_the_npy_rows(cli, embeddings, mlp_model, tmp_path, layout):
    data = tmp_path / "data"
    data.mkdir()
    file = write_safetensors(data, embeddings["values"].astype(np.float16).astype(np.float32), extra=layout == "key column")
    table = pd.read_csv(embeddings["train"])
    table["path"] = f"data/{file.name}"
    if layout == "key column":
        table["key"] = "embeddings"
    manifest = tmp_path / "m.csv"
    table.to_csv(manifest, index=False)
    npy_manifest = tmp_path / "npy.csv"
    pd.read_csv(embeddings["train"]).assign(path="data/rows.npy").to_csv(npy_manifest, index=False)
    np.save(data / "rows.npy", embeddings["values"].astype(np.float16))  # the same values: float16 read as float32

    results = {}
    for name, path in (("safetensors", manifest), ("npy", npy_manifest)):
        out = tmp_path / f"scores-{name}.csv"
        code, _, err = cli("score", mlp_model, path, "-o", out, "--boundary", "head", "--device", "cpu")
        assert code == 0, err
        results[name] = pd.read_csv(out).sort_values("index").reset_index(drop=True)
    expected_id = f"data/{file.name}[embeddings][0]" if layout == "key column" else f"data/{file.name}[0]"
    assert results["safetensors"]["id"].iloc[0] == expected_id
    np.testing.assert_allclose(results["safetensors"]["score"], results["npy"]["score"], rtol=1e-6)


def test_dataset_reads_the_indexed_rows_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(300, 3, 2)).astype(np.float64)
    np.save(tmp_path / "a.npy", values)
    save_file({"x": values.astype(np.float32), "y": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    indices = rng.permutation(300)[:200]
    table = pd.DataFrame({
        "path": ["a.npy"] * 100 + ["b.safetensors"] * 100, "label": "c", "index": indices,
        "key": [""] * 100 + ["x"] * 100,
    })
    table.to_csv(tmp_path / "m.csv", index=False)
    rows = read_manifest(tmp_path / "m.csv").resolved_paths()
    assert check_tensor_rows(rows) == (3, 2)
    dataset = TensorDataset(rows, (3, 2))
    sparse = dataset.__getitems__(list(range(0, 200, 7)))  # scattered indices: row-by-row reads from safetensors
    dense = dataset.__getitems__(list(range(100, 200)))  # one file, the slice path
    for items in (sparse, dense, [dataset[150]]):
        for tensor, row, error in items:
            assert error is None and tensor.dtype == torch.float32
            np.testing.assert_allclose(tensor.numpy(), values[indices[row]], rtol=1e-6)
    copy = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker gets: no open files, reopened there
    assert copy._readers == {} and dataset._readers
    np.testing.assert_allclose(copy[5][0].numpy(), values[indices[5]], rtol=1e-6)


@pytest.mark.parametrize("block_rows", [1, 2, 5, 65_536])
def test_rows_are_grouped_by_file_and_key_in_order_of_first_appearance(tmp_path, monkeypatch, block_rows):
    """Each row's source (file, key), numbered in the order the sources first appear, whatever the blocks."""
    import irank.formats.tensor_rows as tensors_module

    monkeypatch.setattr(tensors_module, "BUILD_ROWS", block_rows)
    np.save(tmp_path / "a.npy", np.zeros((4, 2), np.float32))
    save_file({"x": np.zeros((4, 2), np.float32), "y": np.zeros((4, 2), np.float32)}, str(tmp_path / "b.safetensors"))
    files = ["b.safetensors", "a.npy", "b.safetensors", "a.npy", "b.safetensors", "b.safetensors", "a.npy"]
    keys = ["y", "", "x", "", "y", "x", ""]
    pd.DataFrame({"path": files, "key": keys, "index": [0, 1, 2, 3, 1, 1, 2], "label": "c"}).to_csv(tmp_path / "m.csv",
                                                                                                   index=False)
    rows = read_manifest(tmp_path / "m.csv").resolved_paths()
    assert [(source.written, source.key, source.first_row) for source in rows.sources] == [
        ("b.safetensors", "y", 0), ("a.npy", None, 1), ("b.safetensors", "x", 2)]
    assert rows.source_of_row.tolist() == [0, 1, 2, 1, 0, 2, 1]
    assert rows.index_of_row.tolist() == [0, 1, 2, 3, 1, 1, 2]


def test_rows_without_keys_share_the_file_codes_and_a_subset_still_finds_its_files(tmp_path):
    """Without keys a row's source number is its path's code (first appearance order both): the array is
    shared, a byte a row. A subset recodes its paths in another order and gets a mapping of its own."""
    for name in ("a", "b", "c"):
        np.save(tmp_path / f"{name}.npy", np.zeros((4, 2), np.float32))
    files = ["b.npy", "a.npy", "b.npy", "c.npy", "a.npy"]
    pd.DataFrame({"path": files, "index": [0, 1, 2, 3, 2], "label": "c"}).to_csv(tmp_path / "m.csv", index=False)
    manifest = read_manifest(tmp_path / "m.csv")
    assert manifest.tensor_index.dtype == np.int32 and manifest.paths.codes.dtype == np.uint8
    rows = manifest.resolved_paths()
    assert rows.source_of_row is manifest.paths.codes and rows.index_of_row is manifest.tensor_index
    assert [path.name for path in rows] == files
    subset = manifest.subset([3, 4, 0])  # codes renumbered by value: c, a, b → 2, 0, 1
    assert [path.name for path in subset.resolved_paths()] == ["c.npy", "a.npy", "b.npy"]
    assert subset.resolved_paths().index_of_row.tolist() == [3, 2, 0]


def test_an_index_past_int32_is_kept_whole():
    from irank.formats.columns import int32_if_fits

    assert int32_if_fits(np.array([0, 2**31 - 1])).dtype == np.int32
    assert int32_if_fits(np.array([0, 2**31])).tolist() == [0, 2**31]


def test_worker_processes_read_tensor_rows(cli, embeddings, mlp_model):
    results = []
    for workers in ("0", "2"):
        code, out, err = cli("eval", mlp_model, embeddings["test"], "--json", "--device", "cpu", "--num-workers", workers,
                             "--batch-size", "64")
        assert code == 0, err
        results.append(json.loads(out)["accuracy"])
    assert results[0] == results[1]


def bad_manifest(embeddings, folder: Path, case: str) -> tuple[Path, list[str]]:
    """A manifest in `folder` with one kind of bad input, and what its one-line message must name."""
    table = pd.read_csv(embeddings["train"]).head(40)
    np.save(folder / "train.npy", embeddings["values"][:40])
    needles = ["m.csv"]
    if case == "no index column":
        table = table.drop(columns=["index"])
        needles += ["'index' column"]
    elif case == "index not an integer":
        table["index"] = table["index"].astype(str)
        table.loc[7, "index"] = "2.5"
        needles += ["row 8", "'2.5'", "not a whole number"]
    elif case == "negative index":
        table.loc[3, "index"] = -1
        needles += ["row 4", "negative"]
    elif case == "empty index":
        table["index"] = table["index"].astype(str)
        table.loc[5, "index"] = ""
        needles += ["row 6", "empty index"]
    elif case == "index out of range":
        table.loc[9, "index"] = 40
        needles += ["row 10", "train.npy", "index 40 is out of range", "40 rows"]
    elif case == "missing file":
        table.loc[12:, "path"] = "gone.npy"
        needles += ["gone.npy", "row 13", "no such file"]
    elif case == "not an npy file":
        (folder / "junk.npy").write_bytes(b"not numpy at all")
        table["path"] = "junk.npy"
        needles += ["junk.npy", "row 1", "not a .npy file"]
    elif case == "non-numeric dtype":
        np.save(folder / "text.npy", np.array(["a", "b", "c"] * 20))
        table["path"] = "text.npy"
        needles += ["text.npy", "dtype <U1 is not numeric"]
    elif case == "object dtype":
        np.save(folder / "objects.npy", np.array([{"a": 1}] * 40, dtype=object), allow_pickle=True)
        table["path"] = "objects.npy"
        needles += ["objects.npy", "dtype object is not numeric"]
    elif case == "truncated npy":
        (folder / "cut.npy").write_bytes((folder / "train.npy").read_bytes()[:500])
        table["path"] = "cut.npy"
        needles += ["cut.npy", "not a readable .npy file"]
    elif case == "several tensors, no key":
        save_file({"a": np.zeros((40, DIM), np.float32), "b": np.zeros((40, DIM), np.float32)}, str(folder / "two.safetensors"))
        table["path"] = "two.safetensors"
        needles += ["two.safetensors", "row 1", "holds 2 tensors (a, b)", "'key' column"]
    elif case == "unknown key":
        save_file({"a": np.zeros((40, DIM), np.float32)}, str(folder / "one.safetensors"))
        table["path"] = "one.safetensors"
        table["key"] = "a"
        table.loc[20:, "key"] = "nope"
        needles += ["one.safetensors", "row 21", "no tensor named 'nope'"]
    elif case == "corrupt safetensors":
        (folder / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        table["path"] = "bad.safetensors"
        needles += ["bad.safetensors", "row 1", "not a readable .safetensors file"]
    elif case == "key on an npy row":
        table["key"] = "x"
        needles += ["train.npy", "leave 'key' empty"]
    elif case == "shapes differ":
        np.save(folder / "narrow.npy", np.zeros((40, 8), np.float32))
        table.loc[30:, "path"] = "narrow.npy"
        needles += ["differ in shape", "16 in train.npy (row 1)", "8 in narrow.npy (row 31)"]
    elif case == "mixed manifest":
        table.loc[25, "path"] = "images/cat.png"
        needles += ["row 26", "'images/cat.png'", "not both"]
    elif case == "rows of the wrong width":
        np.save(folder / "narrow.npy", np.zeros((40, 8), np.float32))
        table["path"] = "narrow.npy"
        needles = [ARCH, "takes rows of 16 values", "m.csv", "hold 8"]
    elif case == "NaN values":
        values = embeddings["values"][:40].copy()
        values[2, 5] = np.nan
        np.save(folder / "nan.npy", values)
        table["path"] = "nan.npy"
        needles = ["NaN", "manifest rows 3"]
    elif case == "outside the root":
        table["path"] = "../elsewhere.npy"
        needles += ["row 1", "outside the manifest's folder"]
    else:
        raise AssertionError(case)
    path = folder / "m.csv"
    table.to_csv(path, index=False)
    return path, needles


BAD_CASES = ["no index column", "index not an integer", "negative index", "empty index", "index out of range",
             "missing file", "not an npy file", "non-numeric dtype", "object dtype", "truncated npy", "several tensors, no key", "unknown key", "corrupt safetensors",
             "key on an npy row", "shapes differ", "mixed manifest", "rows of the wrong width", "NaN values", "outside the root"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_tensor_input_is_one_line_and_writes_nothing(cli, embeddings, mlp_model, tmp_path, case):
    manifest, needles = bad_manifest(embeddings, tmp_path, case)
    out = tmp_path / "scores.csv"
    assert_clean_failure(cli("score", mlp_model, manifest, "-o", out, "--device", "cpu"), *needles, output=out)


def test_image_preprocessing_flags_are_refused_for_tensor_rows(cli, embeddings, mlp_model, tmp_path):
    out = tmp_path / "scores.csv"
    assert_clean_failure(cli("score", mlp_model, embeddings["train"], "-o", out, "--mean", "0.5"),
                         "--mean", "tensor rows", output=out)
    refined = tmp_path / "r.safetensors"
    assert_clean_failure(cli("refine", mlp_model, embeddings["train"], "-o", refined, "--scope", "full",
                             "--augment", "flip", "--device", "cpu"), "--augment flip", "tensor rows", output=refined)


def test_val_manifest_of_another_kind_is_refused(cli, embeddings, tiny_data, mlp_model, tmp_path):
    out = tmp_path / "r.safetensors"
    assert_clean_failure(cli("refine", mlp_model, embeddings["train"], "-o", out, "--val", tiny_data["test"],
                             "--device", "cpu"), "--val", "holds images", "tensor rows of shape 16", output=out)


def test_on_bad_image_skip_leaves_bad_tensor_rows_out(cli, embeddings, mlp_model, tmp_path):
    table = pd.read_csv(embeddings["train"])
    np.save(tmp_path / "train.npy", embeddings["values"])
    table.loc[[5, 17], "index"] = [400, 9999]  # past the end
    table.loc[30:34, "path"] = "gone.npy"  # five rows in a missing file
    table.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "scores.csv"
    assert_clean_failure(cli("score", mlp_model, tmp_path / "m.csv", "-o", out, "--device", "cpu"), "row 6", output=out)
    code, _, err = cli("score", mlp_model, tmp_path / "m.csv", "-o", out, "--device", "cpu", "--on-bad-image", "skip")
    assert code == 0, err
    skipped = json.loads((tmp_path / "scores.csv.json").read_text())["skipped_rows"]
    assert [item["row"] for item in skipped] == [6, 18, 31, 32, 33, 34, 35]
    assert "out of range" in skipped[0]["reason"] and "no such file" in skipped[2]["reason"]
    assert len(pd.read_csv(out)) == 400 - 7


def test_review_shows_a_placeholder_and_apply_keeps_the_index(cli, embeddings, mlp_model, tmp_path):
    scores = tmp_path / "scores.csv"
    assert cli("score", mlp_model, embeddings["train"], "-o", scores, "--device", "cpu")[0] == 0
    pack = tmp_path / "review"
    code, out, err = cli("review", scores, "-o", pack, "--top", "10", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["missing_images"] == 0 and summary["tensor_rows"] == 10
    assert "not found" not in err
    page = (pack / "index.html").read_text()
    assert page.count("data:image/svg+xml;base64,") >= 10

    reviewed = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    reviewed.loc[0, "decision"], reviewed.loc[0, "new_label"] = "relabel", reviewed.loc[0, "true_label"]
    reviewed.loc[1, "decision"] = "remove"
    reviewed.to_csv(pack / "review.csv", index=False)
    fixed = tmp_path / "fixed.csv"
    code, _, err = cli("apply", pack / "review.csv", embeddings["train"], "-o", fixed)
    assert code == 0, err
    result = pd.read_csv(fixed)
    original = pd.read_csv(embeddings["train"])
    result["index"] = result["index"].astype(int)
    assert len(result) == 399 and list(result.columns) == ["id", *original.columns]  # written elsewhere: rebased, ids added
    assert result["id"].str.fullmatch(r"train\.npy\[\d+\]").all()
    relabeled_index = int(reviewed.loc[0, "index"])
    assert result.set_index("index").loc[relabeled_index, "label"] == reviewed.loc[0, "true_label"]
    assert int(reviewed.loc[1, "index"]) not in set(result["index"])


def test_post_train_on_tensor_rows(cli, embeddings, mlp_model, tmp_path):
    out_dir = tmp_path / "post"
    code, _, err = cli("post-train", mlp_model, embeddings["train"], "--out-dir", out_dir, "--budget", "0.15",
                       "--rounds", "2", "--val", embeddings["test"], "--device", "cpu", "--quiet")
    assert code == 0, err
    removed = pd.read_csv(out_dir / "removed.csv")
    assert len(removed) == 60 and "index" in removed.columns
    assert flipped_mask(removed).mean() >= 0.6
    assert read_checkpoint(str(out_dir / "final.safetensors")).metadata["arch"] == ARCH


def test_image_arrays_in_an_npy_file_train_a_cnn(cli, tiny_data, tmp_path):
    """Rows of any shape: images stored as one (n, 3, 16, 16) array go through tiny-cnn, and `irank layers`
    traces the shape the checkpoint was trained on."""
    from PIL import Image

    table = pd.read_csv(tiny_data["test"])
    arrays = np.stack([np.asarray(Image.open(Path(tiny_data["folder"]) / path).convert("RGB"), dtype=np.float32)
                       .transpose(2, 0, 1) / 255 for path in table["path"]])
    np.save(tmp_path / "images.npy", arrays)
    manifest = tmp_path / "m.jsonl"  # JSON Lines: the index is a JSON number
    pd.DataFrame({"path": "images.npy", "label": table["label"], "index": np.arange(len(table))}).to_json(
        manifest, orient="records", lines=True)
    model = tmp_path / "cnn.safetensors"
    code, _, err = cli("train", "tiny-cnn", manifest, "-o", model, "--epochs", "1", "--device", "cpu")
    assert code == 0, err
    assert read_checkpoint(str(model)).metadata["input_shape"] == [3, 16, 16]
    code, out, err = cli("layers", model, "--json")
    assert code == 0, err
    shapes = {row["name"]: row["shape"] for row in json.loads(out)["layers"]}
    assert shapes["features.0"] == [8, 8, 8]  # 16×16 in, halved by the first block
    scores = tmp_path / "s.csv"
    code, _, err = cli("score", model, manifest, "-o", scores, "--device", "cpu")
    assert code == 0, err
    assert pd.read_csv(scores)["id"].str.fullmatch(r"images\.npy\[\d+\]").all()


def write_rows(folder: Path, rows: list[tuple[str, str, int]]) -> Path:
    """A tensor-row manifest without an id column: (path, key, index) per row; "" = no key."""
    lines = ["path,key,index,label"] + [f"{path},{key},{index},a" for path, key, index in rows]
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return folder / "m.csv"


def test_made_ids_are_the_ids_tensor_row_ids_writes(tmp_path):
    from irank.formats.tensor_rows import tensor_row_ids

    rows = [("e.npy", "", 0), ("e.npy", "", 1), ("w.safetensors", "x", 0), ("w.safetensors", "y", 0), ("e.npy", "", 10)]
    manifest = read_manifest(write_rows(tmp_path, rows))
    expected = tensor_row_ids([r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows]))
    assert list(manifest.ids) == expected == ["e.npy[0]", "e.npy[1]", "w.safetensors[x][0]", "w.safetensors[y][0]",
                                              "e.npy[10]"]
    assert manifest.ids[-1] == "e.npy[10]" and manifest.ids[1:3] == expected[1:3]
    assert manifest.subset([4, 0]).ids == ["e.npy[10]", "e.npy[0]"]


@pytest.mark.parametrize("rows, message", [
    ([("e.npy", "", 0), ("e.npy", "", 1), ("f.npy", "", 1), ("e.npy", "", 1)], "duplicate id 'e.npy[1]' in rows 2 and 4"),
    ([("w.safetensors", "x", 3), ("w.safetensors", "y", 3), ("w.safetensors", "x", 3)],
     "duplicate id 'w.safetensors[x][3]' in rows 1 and 3"),
    # paths with brackets are compared as ids (see TensorRowIds.first_duplicate): different ids stay apart
    ([("a[k].npy", "", 1), ("a.npy", "", 1), ("a[k].npy", "", 2)], None),
    ([("w[x].safetensors", "", 1), ("w.safetensors", "", 0)], None),
])
def test_duplicate_made_ids_are_refused_naming_both_rows(tmp_path, rows, message):
    from irank.runtime.errors import ManifestError

    path = write_rows(tmp_path, rows)
    if message is None:
        assert len(read_manifest(path).ids) == len(rows)
        return
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_manifest(path)


def test_ids_spelled_alike_by_different_rows_are_duplicates():
    """File `d.npy` with key `z` and a file named `d.npy[z]` without one, both at index 4, spell one id:
    a comparison of (file, key, index) alone would miss it."""
    from irank.formats.tensor_rows import TensorRowIds

    ids = TensorRowIds(["d.npy", "d.npy[z]"], ["z", ""], np.array([4, 4]))
    assert ids[0] == ids[1] == "d.npy[z][4]"
    assert ids.first_duplicate() == (0, 1)
    assert TensorRowIds(["d.npy", "d.npy"], ["z", ""], np.array([4, 4])).first_duplicate() is None


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["e.npy", "f.npy"]), st.sampled_from(["", "x", "y"]), st.integers(0, 4)),
                min_size=1, max_size=30), st.booleans())
def test_the_first_repeated_made_id_is_the_plain_definitions(rows, huge):
    """(earlier row, row) of the first row whose made id an earlier row has: as a dict of ids finds it, through
    one number a row, or through the triples when the indices leave no room for one number."""
    from irank.formats.columns import CodedColumn
    from irank.formats.tensor_rows import TensorRowIds

    paths, keys, indices = zip(*rows)
    indices = np.array(indices, dtype=np.int64) + (2**61 if huge else 0)
    ids = TensorRowIds(CodedColumn.of(paths), CodedColumn.of(keys), indices)
    first: dict[str, int] = {}
    expected = None
    for row, sample_id in enumerate(ids):
        if sample_id in first:
            expected = (first[sample_id], row)
            break
        first[sample_id] = row
    assert ids.first_duplicate() == expected


def test_non_finite_features_outside_the_layer_choice_sample_name_their_manifest_rows(cli, embeddings, mlp_model,
                                                                                    tmp_path):
    """--layer auto reads the rows outside its sample afterwards, as a contiguous block: a NaN there is refused,
    naming the manifest row."""
    from irank.core.layer_choice import choice_sample

    sample = set(choice_sample(400, limit=10).tolist())
    bad = [row for row in range(400) if row not in sample][5:7]
    values = embeddings["values"].copy()
    table = pd.read_csv(embeddings["train"])
    values[table.loc[bad, "index"]] = np.nan
    np.save(tmp_path / "train.npy", values)
    table.to_csv(tmp_path / "train.csv", index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", mlp_model, tmp_path / "train.csv", "-o", out, "--choice-rows", "10"),
                         "NaN or infinite", f"rows {bad[0] + 1}, {bad[1] + 1})", output=out)


def test_rejudge_on_tensor_rows_fine_tunes_without_image_augmentation(cli, embeddings, mlp_model, tmp_path):
    out_dir = tmp_path / "post"
    code, _, err = cli("post-train", mlp_model, embeddings["train"], "--out-dir", out_dir, "--budget", "0.15",
                       "--rejudge", "--rounds", "2", "--epochs", "1", "--device", "cpu", "--quiet")
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["config"]["train"]["augment"] == "auto" and summary["config"]["train"]["scope"] == "full"
    assert [r["boundary"] for r in summary["rounds"]] == ["refit", "head"]
