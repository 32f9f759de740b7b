"""Ctrl-C (SIGINT), SIGTERM or a crash (SIGKILL) at the worst moment leaves the previous outputs intact and no
partial file.

Each command runs as a subprocess that pauses once its new output is fully written to the temporary
file but not yet renamed into place (tests/helpers/hold_before_rename.py); the test then signals it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

HELPER = Path(__file__).parent / "helpers" / "hold_before_rename.py"
SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM"),
           pytest.param(signal.SIGKILL, id="SIGKILL")]
# what irank says and exits with on the signals it handles (SIGTERM, as containers and schedulers send it, like Ctrl-C)
HANDLED = {signal.SIGINT: (130, "irank: interrupted; no partial output was written"),
           signal.SIGTERM: (143, "irank: terminated (SIGTERM); no partial output was written")}


def interrupt_at(args: list, hold: str, ready: Path, sig: int) -> tuple[int, str]:
    """Run irank ARGS, wait until it is about to publish `hold`, send `sig`; return (exit code, stderr)."""
    # A shell that starts a job in the background ignores SIGINT in it, and the child would inherit that
    # (CI runners may do so): give the command the default disposition a terminal's Ctrl-C meets.
    process = subprocess.Popen([sys.executable, str(HELPER), hold, str(ready), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"finished before the pause (code {process.returncode}): {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("never reached the pause")
        time.sleep(0.02)
    assert Path(ready.read_text()).exists()  # the complete new output sits in its temporary file
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def check_folder_after(sig, code: int, err: str, folder: Path, before: dict[str, bytes], resume_state: str = "") -> None:
    """`before` is untouched; nothing new but a hidden temp file after SIGKILL and `resume_state` (kept to resume from)."""
    after = snapshot(folder)
    if resume_state:
        assert after.pop(resume_state)
    if sig in HANDLED:
        assert code == HANDLED[sig][0], err
        assert err.strip().splitlines()[-1] == HANDLED[sig][1], err
        assert "Traceback" not in err
        assert after == before  # not even a temporary file remains
    else:
        assert code == -signal.SIGKILL
        leftovers = {name for name in after if name not in before}
        assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers
        assert {name: data for name, data in after.items() if name in before} == before


@pytest.fixture
def scores(tiny_data, tiny_model, tmp_path_factory) -> Path:
    import irank

    path = tmp_path_factory.mktemp("scores") / "s.csv"
    irank.score(tiny_model, tiny_data["train"], output=str(path), run_options=irank.RunOptions(device="cpu"))
    return path


@pytest.mark.parametrize("sig", SIGNALS)
def test_score(sig, tiny_data, tiny_model, tmp_path, scores):
    out = tmp_path / "out"
    out.mkdir()
    (out / "s.csv").write_bytes(scores.read_bytes())
    (out / "s.csv.json").write_text("{}\n")
    before = snapshot(out)
    code, err = interrupt_at(["score", tiny_model, tiny_data["train"], "-o", out / "s.csv", "--device", "cpu",
                              "--overwrite"], "s.csv", tmp_path / "ready", sig)
    check_folder_after(sig, code, err, out, before)


@pytest.mark.parametrize("sig", SIGNALS)
def test_prune(sig, tiny_data, tmp_path, scores):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.csv").write_text("path,label\nold.png,a\n")
    before = snapshot(out)
    code, err = interrupt_at(["prune", scores, tiny_data["train"], "--count", "5", "-o", out / "kept.csv",
                              "--overwrite"], "kept.csv", tmp_path / "ready", sig)
    check_folder_after(sig, code, err, out, before)


@pytest.mark.parametrize("sig", SIGNALS)
def test_apply(sig, tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ids = pd.read_csv(tiny_data["train"])["path"].head(2).tolist()
    reviewed = tmp_path / "review.csv"
    pd.DataFrame({"id": ids, "decision": ["remove", "keep"], "new_label": ["", ""]}).to_csv(reviewed, index=False)
    (out / "fixed.csv").write_text("path,label\nold.png,a\n")
    before = snapshot(out)
    code, err = interrupt_at(["apply", reviewed, tiny_data["train"], "-o", out / "fixed.csv", "--overwrite"],
                             "fixed.csv", tmp_path / "ready", sig)
    check_folder_after(sig, code, err, out, before)


@pytest.mark.parametrize("sig", SIGNALS)
def test_refine(sig, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "r.safetensors").write_bytes(Path(tiny_model).read_bytes())
    before = snapshot(out)
    code, err = interrupt_at(["refine", tiny_model, tiny_data["train"], "-o", out / "r.safetensors", "--epochs", "1",
                              "--device", "cpu", "--overwrite"], "r.safetensors", tmp_path / "ready", sig)
    check_folder_after(sig, code, err, out, before, resume_state="r.safetensors.resume")


def post_train_args(tiny_data, tiny_model) -> list:
    return [tiny_model, tiny_data["train"], "--rounds", "2", "--step", "0.05", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def reference_run(tiny_data, tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted post-train run."""
    from irank.cli import app

    reference = tmp_path_factory.mktemp("reference") / "post"  # as deep as each test's out: same relative paths
    app(["post-train", *map(str, post_train_args(tiny_data, tiny_model)), "--out-dir", str(reference), "--overwrite"],
        standalone_mode=False)
    return reference


@pytest.mark.parametrize("sig", SIGNALS)
def test_post_train_keeps_finished_rounds_and_resumes_to_the_same_result(sig, cli, tiny_data, tiny_model, tmp_path,
                                                                          reference_run):
    args = post_train_args(tiny_data, tiny_model)
    reference = reference_run
    out = tmp_path / "out"
    # Round 2's model is complete in .round-02.tmp/ but the round is not finished.
    code, err = interrupt_at(["post-train", *args, "--out-dir", out], "model.safetensors#2", tmp_path / "ready", sig)
    assert code == (HANDLED[sig][0] if sig in HANDLED else -signal.SIGKILL), err
    if sig in HANDLED:  # the one line says what is kept, and how to go on
        assert err.strip().splitlines()[-1].endswith(f"--out-dir {out} keeps what finished: run the same command "
                                                     "again to resume"), err
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["removed.csv", "round-01", "summary.json"]
    assert same_weights(out / "round-01" / "model.safetensors", reference / "round-01" / "model.safetensors")
    if sig in HANDLED:
        assert not list(out.glob(".*"))
    code, _, err = cli("post-train", *args, "--out-dir", out)
    assert code == 0, err
    assert not list(out.glob(".*"))
    assert same_weights(out / "final.safetensors", reference / "final.safetensors")  # metadata names the folder
    for name in ("removed.csv", "round-02/kept.csv", "round-02/scores.csv"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def same_weights(first: Path, second: Path) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)
