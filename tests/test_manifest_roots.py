"""Manifests stay usable wherever irank writes them (a sealed data root in their sidecar), without weakening
the containment of manifests from elsewhere; an ImageFolder goes straight in where a manifest goes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_errors import assert_clean_failure


@pytest.fixture(autouse=True)
def own_key(tmp_path, monkeypatch):
    """Each test seals with a key of its own (IRANK_HOME), as another user or machine would."""
    monkeypatch.setenv("IRANK_HOME", str(tmp_path / "irank-home"))


@pytest.fixture
def image_folder(tiny_data, tmp_path) -> Path:
    """The tiny training images as an ImageFolder: images/<label>/<name>.png (the noisy labels)."""
    table = pd.read_csv(tiny_data["train"]).head(80)
    for path, label in zip(table["path"], table["label"]):
        target = tmp_path / "data" / "images" / label / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tiny_data["folder"]) / path, target)
    return tmp_path / "data" / "images"


def score_ok(cli, model, manifest, out) -> pd.DataFrame:
    code, _, err = cli("score", model, manifest, "-o", out, "--device", "cpu", "-q")
    assert code == 0, err
    return pd.read_csv(out)


def test_irank_manifest_outside_the_images_folder_is_read_with_no_flag(cli, tiny_model, image_folder, tmp_path):
    (tmp_path / "work").mkdir()
    manifest = tmp_path / "work" / "train.csv"
    code, _, err = cli("manifest", image_folder, "-o", manifest, "-q")
    assert code == 0, err
    assert pd.read_csv(manifest)["path"].str.startswith("../data/images/").all()
    assert json.loads(Path(f"{manifest}.json").read_text())["data_root"] == str(image_folder.resolve())
    assert len(score_ok(cli, tiny_model, manifest, tmp_path / "s.csv")) == 80


def test_prune_and_apply_into_other_folders_write_manifests_every_command_reads(cli, tiny_model, image_folder,
                                                                                tmp_path):
    manifest = image_folder.parent / "train.csv"
    assert cli("manifest", image_folder, "-o", manifest, "-q")[0] == 0
    scores = score_ok(cli, tiny_model, manifest, tmp_path / "s.csv")
    (tmp_path / "other").mkdir()
    clean = tmp_path / "other" / "clean.csv"
    assert cli("prune", tmp_path / "s.csv", manifest, "--count", "5", "-o", clean, "-q")[0] == 0
    assert len(score_ok(cli, tiny_model, clean, tmp_path / "s2.csv")) == 75
    reviewed = tmp_path / "review.csv"
    first = scores.sort_values("rank")["id"].iloc[0]
    pd.DataFrame({"id": [first], "decision": ["remove"], "new_label": [""]}).to_csv(reviewed, index=False)
    (tmp_path / "elsewhere").mkdir()
    fixed = tmp_path / "elsewhere" / "fixed.csv"
    code, _, err = cli("apply", reviewed, manifest, "-o", fixed, "-q")
    assert code == 0, err
    assert len(score_ok(cli, tiny_model, fixed, tmp_path / "s3.csv")) == 79
    code, out, err = cli("eval", tiny_model, fixed, "--json", "-q")  # every command, not score alone
    assert code == 0 and json.loads(out)["num_samples"] == 79, err


def test_a_manifest_from_elsewhere_is_still_held_to_its_folder(cli, tiny_model, image_folder, tmp_path):
    """An edited sealed manifest, a forged sidecar, another key's seal: each is checked against its own folder."""
    (tmp_path / "work").mkdir()
    manifest = tmp_path / "work" / "train.csv"
    assert cli("manifest", image_folder, "-o", manifest, "-q")[0] == 0
    secret = tmp_path / "secret.png"
    shutil.copyfile(next(image_folder.rglob("*.png")), secret)
    table = pd.read_csv(manifest)
    table.loc[0, "path"] = "../secret.png"  # outside the recorded data folder too
    edited = tmp_path / "work" / "edited.csv"
    table.to_csv(edited, index=False)
    shutil.copyfile(f"{manifest}.json", f"{edited}.json")
    assert_clean_failure(cli("score", tiny_model, edited, "-o", tmp_path / "s.csv"), "outside")
    sidecar = json.loads(Path(f"{manifest}.json").read_text())
    Path(f"{manifest}.json").write_text(json.dumps({**sidecar, "data_root": "/"}))  # a wider root, the old seal
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", tmp_path / "s.csv"), "outside the manifest's folder")
    Path(f"{manifest}.json").write_text(json.dumps(sidecar))
    assert len(score_ok(cli, tiny_model, manifest, tmp_path / "s.csv")) == 80  # restored: read again
    shutil.rmtree(tmp_path / "irank-home")  # another account: no key, no trust
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", tmp_path / "s4.csv"), "--allow-outside-root")


def test_an_image_folder_goes_straight_in(cli, tiny_model, image_folder, tmp_path):
    table = score_ok(cli, tiny_model, image_folder, tmp_path / "s.csv")
    assert len(table) == 80 and set(table["label"]) <= {"cross", "disk", "hstripes", "vstripes"}
    assert table["id"].str.match(r"^(cross|disk|hstripes|vstripes)/\d+\.png$").all()  # relative to the folder
    code, out, err = cli("eval", tiny_model, image_folder, "--json", "-q")
    assert code == 0 and json.loads(out)["num_samples"] == 80, err
    code, _, err = cli("refine", tiny_model, image_folder, "-o", tmp_path / "r.safetensors", "--epochs", "1",
                       "--device", "cpu", "-q")
    assert code == 0, err
    code, _, err = cli("train", "tiny-cnn", image_folder, "-o", tmp_path / "t.safetensors", "--epochs", "1",
                       "--device", "cpu", "-q")
    assert code == 0, err
    code, _, err = cli("post-train", tiny_model, image_folder, "--out-dir", tmp_path / "post", "--rounds", "1",
                       "--step", "0.1", "--device", "cpu", "-q")
    assert code == 0, err
    assert (tmp_path / "post" / "final.safetensors").exists()
    code, _, err = cli("prune", tmp_path / "s.csv", image_folder, "--count", "3", "-o", tmp_path / "kept.csv", "-q")
    assert code == 0 and len(pd.read_csv(tmp_path / "kept.csv")) == 77, err
    assert len(score_ok(cli, tiny_model, tmp_path / "kept.csv", tmp_path / "s5.csv")) == 77
