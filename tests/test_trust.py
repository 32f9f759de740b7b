"""Trust: a checkpoint never runs code, a command's outputs change together or not at all, every input is
protected, a failed run leaves nothing, and a flag that would do nothing is refused. Through the CLI, asserting
on the files and the exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from test_errors import assert_clean_failure, manifest_copy

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint ran code")
from irank.model.architectures import SmallCNN
def build(num_classes):
    return SmallCNN(num_classes, widths=(8, 16, 32))
"""


def with_metadata(source: str, target: Path, **changes) -> Path:
    """A copy of checkpoint `source` whose irank metadata has `changes` (a value None removes the key)."""
    with safe_open(source, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = json.loads(handle.metadata()["irank"])
    metadata.update(changes)
    save_file(tensors, str(target), metadata={"irank": json.dumps({k: v for k, v in metadata.items() if v is not None})})
    return target


@pytest.fixture
def code_checkpoint(tiny_model, tmp_path) -> tuple[Path, Path, Path]:
    """(a checkpoint whose metadata names `evil.py:build`, that file, the marker file it writes when it runs)."""
    marker = tmp_path / "ran.txt"
    factory = tmp_path / "evil.py"
    factory.write_text(EVIL.format(marker=str(marker)))
    return with_metadata(tiny_model, tmp_path / "evil.safetensors", arch=f"{factory}:build"), factory, marker


@pytest.mark.parametrize("command", ["score", "eval", "layers", "refine", "post-train"])
def test_a_checkpoint_that_names_code_is_refused_and_the_code_does_not_run(cli, tiny_data, code_checkpoint, tmp_path,
                                                                           command):
    checkpoint, factory, marker = code_checkpoint
    manifest = manifest_copy(tiny_data, tmp_path)
    args = {"score": ["-o", tmp_path / "s.csv"], "eval": [], "layers": [], "refine": ["-o", tmp_path / "r.safetensors"],
            "post-train": ["--out-dir", tmp_path / "post"]}[command]
    positional = [checkpoint] if command == "layers" else [checkpoint, manifest]
    assert_clean_failure(cli(command, *positional, *args), str(checkpoint), "Python code", f"--arch {factory}:build")
    assert not marker.exists()
    assert not (tmp_path / "post").exists() and not (tmp_path / "s.csv").exists()


def test_a_checkpoint_that_names_a_module_is_refused(cli, tiny_data, tiny_model, tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    (tmp_path / "evilmodule.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = with_metadata(tiny_model, tmp_path / "evil.safetensors", arch="evilmodule:build")
    assert_clean_failure(cli("eval", checkpoint, tiny_data["train"]), "--arch evilmodule:build")
    assert not marker.exists() and "evilmodule" not in sys.modules


def test_code_named_on_the_command_line_runs(cli, tiny_data, code_checkpoint, tmp_path):
    checkpoint, factory, marker = code_checkpoint
    code, out, err = cli("eval", checkpoint, tiny_data["train"], "--arch", f"{factory}:build", "--json", "-q")
    assert code == 0, err
    assert marker.exists() and 0 <= json.loads(out)["accuracy"] <= 1


@pytest.mark.parametrize("changes, needle", [
    ({"arch": 7}, "'arch' is not a JSON str"),
    ({"classes": "cat"}, "'classes' is not a JSON list"),
    ({"classes": [{"name": "a"}, "b", "c", "d"]}, "'classes' must list class names"),
    ({"probe": {"layer": 3}}, "'probe' needs a layer name"),
    ({"preprocess": [1, 2]}, "'preprocess' is not a JSON dict"),
])
def test_malformed_checkpoint_metadata_is_one_line(cli, tiny_data, tiny_model, tmp_path, changes, needle):
    checkpoint = with_metadata(tiny_model, tmp_path / "odd.safetensors", **changes)
    assert_clean_failure(cli("score", checkpoint, tiny_data["train"], "-o", tmp_path / "s.csv"), needle,
                         output=tmp_path / "s.csv")


# --- outputs as a set ------------------------------------------------------------------------------------------

PAUSE_BETWEEN_RENAMES = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import irank.formats.files as files

    ready = Path(sys.argv[1])
    real_publish = files.publish

    def publish(built, target, *, replace):
        real_publish(built, target, replace=replace)
        if not ready.exists():  # the first output of the set is in place, the others are not yet
            ready.write_text(str(target))
            time.sleep(3)

    files.publish = publish
    from irank.entry import main
    sys.argv = ["irank", *sys.argv[2:]]
    main()
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_between_two_renames_waits_for_the_whole_set(sig, tiny_data, tiny_model, tmp_path):
    """prune's kept manifest, its sidecar and the removed rows: a signal in the middle of putting them in place is
    held back until all are there, so they are never a mix of two runs."""
    import irank

    scores = tmp_path / "s.csv"
    irank.score(tiny_model, tiny_data["train"], output=str(scores), run_options=irank.RunOptions(device="cpu"))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("kept.csv", "kept.csv.json", "removed.csv"):
        (out / name).write_text("old\n")
    script = tmp_path / "pause.py"
    script.write_text(PAUSE_BETWEEN_RENAMES)
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, str(script), str(ready), "prune", str(scores), tiny_data["train"],
                                "--count", "7", "-o", str(out / "kept.csv"), "--removed", str(out / "removed.csv"),
                                "--overwrite"], stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(ready, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("no partial output was written"), err
    assert all((out / name).read_text() != "old\n" for name in ("kept.csv", "kept.csv.json", "removed.csv"))
    assert len(pd.read_csv(out / "removed.csv")) == 7
    assert json.loads((out / "kept.csv.json").read_text())["removed_rows"] == 7
    assert sorted(p.name for p in out.iterdir()) == ["kept.csv", "kept.csv.json", "removed.csv"]


def wait_for(ready: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"finished before the pause (code {process.returncode}): {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("never reached the pause")
        time.sleep(0.02)


def test_a_failed_rename_puts_every_earlier_output_back(cli, tiny_data, tiny_model, tmp_path, monkeypatch):
    """A full disk (or any error) at the second rename of a set: the first output goes back to its old bytes."""
    from irank.formats import files

    scores = tmp_path / "s.csv"
    for path in (scores, Path(f"{scores}.json")):
        path.write_text("old\n")
    real_publish, calls = files.publish, []

    def failing_publish(built, target, *, replace):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(target))
        real_publish(built, target, replace=replace)

    monkeypatch.setattr(files, "publish", failing_publish)
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", scores, "--overwrite", "-q")
    assert code == 3 and "No space left on device" in err and "Traceback" not in err
    assert scores.read_text() == "old\n" and Path(f"{scores}.json").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.csv.json"]


def test_an_output_that_appears_during_the_run_is_not_replaced(cli, tiny_data, tiny_model, tmp_path, monkeypatch):
    """Two runs writing the same output without --overwrite: the existence check holds at the rename."""
    from irank.formats import files

    scores = tmp_path / "s.csv"
    real_rename = files.rename_noreplace

    def another_run_wins(source, target):
        if target == scores and not scores.exists():
            scores.write_text("the other run's scores\n")
        real_rename(source, target)

    monkeypatch.setattr(files, "rename_noreplace", another_run_wins)
    assert_clean_failure(cli("score", tiny_model, tiny_data["train"], "-o", scores, "-q"), str(scores),
                         "created by someone else")
    assert scores.read_text() == "the other run's scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]  # not its sidecar either: the set is whole or none


def test_rename_noreplace_refuses_a_taken_name(tmp_path):
    from irank.formats.files import rename_noreplace

    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "a").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError):  # an empty folder is a taken name too (plain rename would replace it)
        rename_noreplace(tmp_path / "d", tmp_path / "e")
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and not (tmp_path / "a").exists()


# --- signals ---------------------------------------------------------------------------------------------------

INTERRUPT_IN_IMPORT = textwrap.dedent("""
    import os, signal, sys

    number = int(sys.argv[1])

    class SignalWhileImporting:
        def find_spec(self, name, path=None, target=None):
            if name == "typer":  # the CLI's first import: irank is starting up
                sys.meta_path.remove(self)
                os.kill(os.getpid(), number)
            return None

    sys.meta_path.insert(0, SignalWhileImporting())
    from irank.entry import main
    sys.argv = ["irank", "version"]
    main()
""")


@pytest.mark.parametrize("sig, code, line", [
    (signal.SIGINT, 130, "irank: interrupted; no partial output was written"),
    (signal.SIGTERM, 143, "irank: terminated (SIGTERM); no partial output was written"),
])
def test_a_signal_during_start_up_is_one_line(tmp_path, sig, code, line):
    script = tmp_path / "start.py"
    script.write_text(INTERRUPT_IN_IMPORT)
    # SIGINT as a terminal delivers it, even where pytest runs as a background job (which ignores SIGINT, and irank
    # keeps an ignored SIGINT ignored)
    done = subprocess.run([sys.executable, str(script), str(int(sig))], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == code, done.stderr
    assert done.stderr == line + "\n"


def test_a_signal_at_any_moment_is_one_line(tiny_data, tiny_model, tmp_path):
    """Ctrl-C a moment after the start, wherever irank then is (importing torch, reading the model, scoring)."""
    for delay in (0.2, 1.0, 2.5):
        process = subprocess.Popen([sys.executable, "-m", "irank", "score", tiny_model, tiny_data["train"], "-o",
                                    str(tmp_path / "s.csv"), "--overwrite", "--device", "cpu"],
                                   stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
        if process.returncode == 0:  # it finished first: nothing to check at this delay
            continue
        if process.returncode == -signal.SIGTERM and not err:  # before Python reached irank's code: not irank's
            continue
        assert process.returncode == 143, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("irank: terminated (SIGTERM)"), err
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- inputs are never outputs ----------------------------------------------------------------------------------

def test_a_hard_link_to_an_input_is_not_an_output(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    linked = tmp_path / "linked.csv"
    os.link(manifest, linked)
    before = manifest.read_bytes()
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", linked), "same file", "manifest")
    assert_clean_failure(cli("prune", linked, manifest, "--count", "1", "-o", tmp_path / "k.csv", "--removed", linked),
                         "same file")
    model_link = tmp_path / "model-link.safetensors"
    os.link(tiny_model, model_link)
    assert_clean_failure(cli("refine", tiny_model, manifest, "-o", model_link, "--epochs", "1"), "same file",
                         "checkpoint")
    assert manifest.read_bytes() == before and linked.read_bytes() == before


def test_the_classes_file_and_val_are_inputs_too(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    classes = tmp_path / "classes.csv"
    classes.write_text("disk\nhstripes\nvstripes\ncross\n")
    assert_clean_failure(cli("score", tiny_model, manifest, "--classes", classes, "-o", classes), "--classes file")
    val = tmp_path / "val.csv"
    val.write_bytes(manifest.read_bytes())
    assert_clean_failure(cli("score", tiny_model, manifest, "--val", val, "-o", val), "--val")
    assert classes.read_text() == "disk\nhstripes\nvstripes\ncross\n" and val.read_bytes() == manifest.read_bytes()


def test_a_tensor_file_the_rows_read_is_not_a_refined_checkpoint(cli, tmp_path):
    import torch

    rows = tmp_path / "rows.safetensors"
    save_file({"x": torch.randn(30, 8)}, str(rows))
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": "rows.safetensors", "index": range(30), "label": [f"c{i % 3}" for i in range(30)]}).to_csv(
        manifest, index=False)
    before = rows.read_bytes()
    code, _, err = cli("train", "mlp-8-16", manifest, "-o", tmp_path / "model.safetensors", "--epochs", "1", "-q")
    assert code == 0, err
    assert_clean_failure(cli("refine", tmp_path / "model.safetensors", manifest, "-o", rows, "--epochs", "1",
                             "--overwrite"), "tensor file rows.safetensors")
    assert rows.read_bytes() == before


# --- a failed run leaves nothing -------------------------------------------------------------------------------

def test_post_train_refused_on_its_input_leaves_no_folder(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    broken = tmp_path / "broken.csv"
    pd.read_csv(manifest).drop(columns=["label"]).to_csv(broken, index=False)
    out = tmp_path / "post"
    assert_clean_failure(cli("post-train", tiny_model, broken, "--out-dir", out), "label")
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(cli("post-train", tiny_model, manifest, "--out-dir", empty, "--arch", "small-cnn"),
                         "does not fit")
    assert list(empty.iterdir()) == []
    # the corrected command is not blocked by anything the failed ones left
    code, _, err = cli("post-train", tiny_model, manifest, "--out-dir", out, "--rounds", "1", "--step", "0.1",
                       "--scope", "refit", "--device", "cpu", "-q")
    assert code == 0, err


def test_post_train_that_fails_before_its_first_epoch_leaves_nothing(cli, tiny_data, tiny_model, tmp_path):
    """A bad image found only when the fine-tune reads it: no epoch finished, so nothing is left to resume."""
    manifest = manifest_copy(tiny_data, tmp_path)
    table = pd.read_csv(manifest)
    (tmp_path / table["path"][3]).write_bytes(b"not an image")
    out = tmp_path / "post"
    code, _, err = cli("post-train", tiny_model, manifest, "--out-dir", out, "--device", "cpu", "--epochs", "1",
                       "--num-workers", "0", "-q")
    assert code == 3 and "Traceback" not in err, err
    assert not out.exists()


# --- flags that would do nothing -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--curvature", "kfac"], "--curvature applies to --boundary head"),
    (["--damping", "0.1"], "--damping applies to --boundary head"),
    (["--boundary", "head", "--method", "loss", "--influence-measure", "boundary-shift"],
     "--influence-measure applies to influence"),
    (["--boundary", "head", "--method", "margin", "--curvature", "exact"], "--curvature applies to influence"),
    (["--method", "gradnorm", "--influence-measure", "self-influence"], "--influence-measure applies to influence"),
    (["--boundary", "head", "--l2", "0.5"], "--l2 needs --boundary refit"),
    (["--boundary", "head", "--choice-rows", "50"], "--choice-rows needs --boundary refit"),
    (["--layer", "features.1", "--choice-rows", "50"], "--choice-rows samples the rows that --layer auto"),
])
def test_score_refuses_a_flag_that_would_do_nothing(cli, tiny_data, tiny_model, tmp_path, args, needle):
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, tiny_data["train"], "-o", out, *args), needle, output=out)


@pytest.mark.parametrize("command, args, needle", [
    ("refine", ["--scope", "refit", "--epochs", "3"], "--epochs does nothing here"),
    ("refine", ["--scope", "refit", "--augment", "flip"], "--augment does nothing here"),
    ("refine", ["--scope", "head", "--l2", "0.5"], "--l2 does nothing here"),
    ("post-train", ["--patience", "2", "--rounds", "2", "--step", "0.05"], "--patience does nothing here"),
    ("post-train", ["--curvature", "kfac"], "--curvature acts on influence"),
    ("post-train", ["--probe-l2", "0.5"], "--probe-l2 is the L2 of a refit probe"),
])
def test_training_commands_refuse_a_flag_that_would_do_nothing(cli, tiny_data, tiny_model, tmp_path, command, args,
                                                                 needle):
    output = ["-o", tmp_path / "r.safetensors"] if command == "refine" else ["--out-dir", tmp_path / "post"]
    assert_clean_failure(cli(command, tiny_model, tiny_data["train"], *output, *args), needle)
    assert not (tmp_path / "post").exists() and not (tmp_path / "r.safetensors").exists()


def test_the_sidecar_records_what_was_computed(cli, tiny_data, tiny_model, tmp_path):
    def parameters(*args) -> dict:
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.csv"
        code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", out, "-q", *args)
        assert code == 0, err
        return json.loads(Path(f"{out}.json").read_text())["parameters"]

    head = parameters("--boundary", "head", "--method", "influence", "--curvature", "kfac", "--damping", "0.1")
    assert (head["curvature"], head["damping"], head["influence_measure"]) == ("kfac", 0.1, "self-influence")
    loss = parameters("--boundary", "head", "--method", "loss")
    assert not {"curvature", "damping", "influence_measure"} & set(loss)
    probe = parameters("--influence-measure", "boundary-shift", "--layer", "features.1")
    assert (probe["influence_measure"], probe["curvature"], probe["l2"]) == ("boundary-shift", "exact", 0.1)
    assert "damping" not in probe
    default = parameters()
    assert default["influence_measure"] is None and "curvature" not in default
