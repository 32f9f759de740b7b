"""An existing output is replaced only with --overwrite; post-train's own folder is its state, not an output."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest


def refused_then_replaced(cli, args: list, output: Path, *, flag: str = "-o"):
    """Run `args` twice: the second run is refused and leaves the output's bytes alone; with --overwrite it works."""
    code, _, err = cli(*args)
    assert code == 0, err
    before = output.read_bytes() if output.is_file() else None
    code, _, err = cli(*args)
    assert code == 3, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("irank: error: ") and "--overwrite" in message and flag in message, message
    if before is not None:
        assert output.read_bytes() == before
    code, _, err = cli(*args, "--overwrite")
    assert code == 0, err


def test_score_refuses_to_replace_scores(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "s.csv"
    refused_then_replaced(cli, ["score", tiny_model, tiny_data["train"], "-o", output, "-q", "--device", "cpu"], output)


def test_score_refuses_to_replace_a_lone_sidecar(cli, tiny_data, tiny_model, tmp_path):
    (tmp_path / "s.csv.json").write_text("{}")
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s.csv", "-q")
    assert code == 3 and "the sidecar" in err and "--overwrite" in err
    assert not (tmp_path / "s.csv").exists()


def test_prune_refuses_to_replace_either_output(cli, tiny_data, tiny_model, tmp_path):
    scores = tmp_path / "s.csv"
    assert cli("score", tiny_model, tiny_data["train"], "-o", scores, "-q")[0] == 0
    kept, removed = tmp_path / "kept.csv", tmp_path / "removed.csv"
    refused_then_replaced(cli, ["prune", scores, tiny_data["train"], "--count", "5", "-o", kept, "-q"], kept)
    removed.write_text("precious\n")
    code, _, err = cli("prune", scores, tiny_data["train"], "--count", "5", "-o", tmp_path / "k2.csv", "--removed", removed)
    assert code == 3 and "--removed" in err and "--overwrite" in err
    assert removed.read_text() == "precious\n" and not (tmp_path / "k2.csv").exists()


def test_manifest_refuses_to_replace(cli, tiny_data, tmp_path):
    tree = tmp_path / "tree"
    (tree / "cat").mkdir(parents=True)
    (tree / "cat" / "a.png").write_bytes((Path(tiny_data["folder"]) / pd.read_csv(tiny_data["train"])["path"][0]).read_bytes())
    output = tmp_path / "m.csv"
    refused_then_replaced(cli, ["manifest", tree, "-o", output, "-q"], output)


def test_refine_and_train_refuse_to_replace_a_checkpoint(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "r.safetensors"
    refused_then_replaced(cli, ["refine", tiny_model, tiny_data["train"], "-o", output, "--epochs", "1", "-q"], output)
    output = tmp_path / "t.safetensors"
    refused_then_replaced(cli, ["train", "tiny-cnn", tiny_data["train"], "-o", output, "--epochs", "1", "-q"], output)


def test_post_train_resumes_in_its_folder_and_overwrite_starts_afresh(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    base = ["post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--rounds", "1", "--step", "0.05", "-q"]
    assert cli(*base)[0] == 0
    final = (out / "final.safetensors").read_bytes()
    code, _, err = cli(*base)  # the same command again: nothing to do, no refusal
    assert code == 0, err
    assert (out / "final.safetensors").read_bytes() == final
    code, _, err = cli(*base[:-2], "0.1", "-q")  # other parameters: refused, the run kept
    assert code == 3 and "--overwrite" in err
    assert json.loads((out / "summary.json").read_text())["config"]["loop"]["step"] == 0.05
    code, _, err = cli(*base[:-2], "0.1", "-q", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["config"]["loop"]["step"] == 0.1


def test_post_train_refuses_files_without_a_summary(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    out.mkdir()
    (out / "final.safetensors").write_text("someone's model")
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", out, "--rounds", "1", "--step", "0.05")
    assert code == 3 and "final.safetensors" in err and "--overwrite" in err
    assert (out / "final.safetensors").read_text() == "someone's model"


def test_post_train_overwrite_never_deletes_its_input(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "post"
    out.mkdir()
    (out / "final.safetensors").write_bytes(Path(tiny_model).read_bytes())
    code, _, err = cli("post-train", out / "final.safetensors", tiny_data["train"], "--out-dir", out, "--rounds", "1",
                       "--step", "0.05", "--overwrite")
    assert code == 3 and "checkpoint" in err
    assert (out / "final.safetensors").read_bytes() == Path(tiny_model).read_bytes()


@pytest.mark.parametrize("text", ["x", "x\ny\n"])
def test_atomic_write_leaves_no_temp_file(tmp_path, text):
    from irank.formats.files import write_text_atomic

    write_text_atomic(tmp_path / "f.txt", text)
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"] and (tmp_path / "f.txt").read_text() == text
