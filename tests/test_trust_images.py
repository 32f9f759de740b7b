"""Every command reads images under one rule (`irank.formats.images`): only regular files are opened, the pixel limit is
checked before decoding, EPS is never handed to Ghostscript, and review refuses images outside the image folder
unless --allow-outside-root. A FIFO, device or socket in a data folder never hangs a command."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_errors import assert_clean_failure, manifest_copy
from test_images import png_header_claiming

import irank
from irank.formats.images import ImageRefused, open_image

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


@pytest.fixture
def no_hang():
    """Fail a test that blocks (on a FIFO's open or read) instead of hanging the suite."""
    def stuck(*_):
        raise TimeoutError("the command blocked")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def unix_socket(path: Path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        yield
    finally:
        server.close()


def special(kind: str, path: Path, stack: contextlib.ExitStack) -> None:
    """Make `path` a FIFO, a socket, a link to a character device, or a folder."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        stack.enter_context(unix_socket(path))
    elif kind == "device":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()


KINDS = {"fifo": "named pipe (FIFO)", "socket": "socket", "device": "character device", "folder": "a folder"}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_score_refuses_a_special_file_without_blocking(cli, tiny_data, tiny_model, tmp_path, no_hang, kind):
    with contextlib.ExitStack() as stack:
        manifest = manifest_copy(tiny_data, tmp_path)
        table = pd.read_csv(manifest)
        special(kind, tmp_path / "images" / "odd.png", stack)
        table.loc[4, "path"] = "images/odd.png"
        table.to_csv(manifest, index=False)
        out = tmp_path / "s.csv"
        flags = ["--num-workers", "0"] + (["--allow-outside-root"] if kind == "device" else [])  # a link to /dev/zero
        assert_clean_failure(cli("score", tiny_model, manifest, "-o", out, *flags), "odd.png", "row 5", KINDS[kind],
                             output=out)
        code, out_text, err = cli("score", tiny_model, manifest, "-o", out, *flags, "-q", "--on-bad-image", "skip", "--json")
        assert code == 0, err
        skipped = __import__("json").loads(out_text)["skipped_rows"]
        assert [(row["row"], KINDS[kind] in row["reason"]) for row in skipped] == [(5, True)]


def test_tensor_rows_in_a_fifo_are_refused_without_blocking(cli, tmp_path, no_hang):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32))
    pd.DataFrame({"path": "x.npy", "label": ["a", "b"] * 4, "index": range(8)}).to_csv(tmp_path / "train.csv", index=False)
    irank.train("linear-4", str(tmp_path / "train.csv"), output=str(tmp_path / "m.safetensors"),
                train_options=irank.TrainOptions(scope="full", epochs=1, seed=0), run_options=irank.RunOptions(device="cpu"))
    os.mkfifo(tmp_path / "y.npy")
    pd.DataFrame({"path": ["x.npy", "y.npy"], "label": ["a", "b"], "index": [0, 1]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tmp_path / "m.safetensors", tmp_path / "m.csv", "-o", out), "y.npy", "row 2",
                         "not a regular file", output=out)


def test_manifest_walks_a_folder_with_special_files_without_blocking(cli, tiny_data, tmp_path, no_hang):
    image = Path(tiny_data["folder"]) / pd.read_csv(tiny_data["train"])["path"][0]
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    shutil.copyfile(image, tmp_path / "tree" / "cat" / "a.png")
    with contextlib.ExitStack() as stack:
        for kind in ("fifo", "socket", "device"):
            special(kind, tmp_path / "tree" / "cat" / f"{kind}.png", stack)
        os.symlink("..", tmp_path / "tree" / "cat" / "loop")
        os.symlink(tmp_path / "tree" / "cat" / "self.png", tmp_path / "tree" / "cat" / "self.png")
        code, _, err = cli("manifest", tmp_path / "tree", "-o", tmp_path / "m.csv")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "m.csv")["path"].tolist() == ["tree/cat/a.png"]


# review: the same rule for its thumbnails

@pytest.fixture(scope="module")
def scored_here(tiny_data, tiny_model, tmp_path_factory) -> Path:
    """Scores of 12 images copied beside their manifest, in a folder of their own (the image root)."""
    folder = tmp_path_factory.mktemp("images-review")
    manifest = manifest_copy(tiny_data, folder, rows=12)
    irank.score(tiny_model, str(manifest), output=str(folder / "scores.csv"),
                run_options=irank.RunOptions(device="cpu", num_workers=0))
    return folder


def scores_pointing(scored_here: Path, folder: Path, paths: dict[int, str]) -> Path:
    """A copy of the scores in `folder` with some rows' paths changed (rank order kept); its images resolve against
    `folder`, where the copied manifest's images are linked in."""
    table = pd.read_csv(scored_here / "scores.csv", dtype=str, keep_default_na=False)
    for row, path in paths.items():
        table.loc[row, "path"] = path
    if not (folder / "images").exists():
        shutil.copytree(scored_here / "images", folder / "images")
    table.to_csv(folder / "scores.csv", index=False)
    return folder / "scores.csv"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_review_shows_a_placeholder_for_a_special_file_without_blocking(cli, scored_here, tmp_path, no_hang, kind):
    with contextlib.ExitStack() as stack:
        special(kind, tmp_path / "odd.png", stack)
        scores = scores_pointing(scored_here, tmp_path, {1: "odd.png"})
        allow = ["--allow-outside-root"] if kind == "device" else []  # a link to /dev/zero
        code, _, err = cli("review", scores, "-o", tmp_path / "r", "--top", "4", *allow)
    assert code == 0, err
    err = " ".join(err.split())
    assert "1 of 4 images not found or unreadable" in err and KINDS[kind] in err
    page = (tmp_path / "r" / "index.html").read_text()
    assert page.count('class="card missing"') == 1 and "image not shown: " in page and KINDS[kind] in page


def test_review_refuses_to_decode_what_score_refuses(cli, scored_here, tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_claiming(100_000, 100_000))
    (tmp_path / "eps.png").write_bytes(EPS)
    scores = scores_pointing(scored_here, tmp_path, {0: "bomb.png", 2: "eps.png"})
    code, _, err = cli("review", scores, "-o", tmp_path / "r", "--top", "4")
    assert code == 0, err
    page = (tmp_path / "r" / "index.html").read_text()
    assert page.count('class="card missing"') == 2 and "refused, not decoded" in page and "cannot decode" in page
    monkeypatch.setenv("IRANK_MAX_IMAGE_PIXELS", "100")  # the 16×16 images are 256 pixels: all refused, as score does
    code, _, err = cli("review", scores, "-o", tmp_path / "r2", "--top", "4")
    assert code == 0, err
    assert "4 of 4 images not found or unreadable" in " ".join(err.split())
    assert (tmp_path / "r2" / "index.html").read_text().count("refused, not decoded") == 3


def test_eps_is_never_handed_to_ghostscript(tmp_path):
    (tmp_path / "x.png").write_bytes(EPS)
    with Image.open(tmp_path / "x.png") as image:  # Pillow alone would take it (and run gs to decode it)
        assert image.format == "EPS"
    with pytest.raises(ImageRefused, match="cannot decode"):
        with open_image(tmp_path / "x.png"):
            pass


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_review_refuses_an_image_outside_the_image_folder_unless_allowed(cli, scored_here, tmp_path, kind):
    inner = tmp_path / "inner"
    inner.mkdir()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    written = {"dotdot": "../secret.png", "absolute": str(secret), "symlink": "link.png"}[kind]
    if kind == "symlink":
        os.symlink(secret, inner / "link.png")
    scores = scores_pointing(scored_here, inner, {2: written})
    out = tmp_path / "r"
    assert_clean_failure(cli("review", scores, "-o", out, "--top", "4"), "rank 3", repr(written),
                         "outside the image folder", "--allow-outside-root", output=out)
    code, _, err = cli("review", scores, "-o", out, "--top", "4", "--allow-outside-root", "-q")
    assert code == 0, err
    assert (out / "index.html").read_text().count('class="card missing"') == 0  # the image was shown


def test_an_image_outside_the_flagged_rows_is_not_looked_at(cli, scored_here, tmp_path):
    scores = scores_pointing(scored_here, tmp_path, {10: "/etc/passwd.png"})  # rank 11: not flagged with --top 4
    code, _, err = cli("review", scores, "-o", tmp_path / "r", "--top", "4", "-q")
    assert code == 0, err


def test_a_bad_pixel_limit_is_refused(cli, scored_here, tmp_path, monkeypatch):
    monkeypatch.setenv("IRANK_MAX_IMAGE_PIXELS", "0")
    out = tmp_path / "r"
    assert_clean_failure(cli("review", scored_here / "scores.csv", "-o", out), "IRANK_MAX_IMAGE_PIXELS='0'", output=out)


def test_a_path_holding_a_nul_character_is_named(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    table = pd.read_csv(manifest)
    table.loc[2, "path"] = "images/a\x00b.png"
    table.to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out, "--num-workers", "0"), "row 3",
                         "the path holds a NUL character", output=out)


def feed(pipe: Path, data: bytes) -> threading.Thread:
    """Write `data` into the named pipe once a reader opens it."""
    writer = threading.Thread(target=pipe.write_bytes, args=(data,), daemon=True)
    writer.start()
    return writer


def test_review_and_apply_read_a_named_pipe_once(cli, scored_here, tiny_data, tmp_path, no_hang):
    """Inputs given as named pipes (which give their bytes once) are read once: the sha256 recorded in the
    outputs is that of those bytes (opening a pipe again to hash it waited for a writer forever)."""
    import hashlib
    import json

    scores_bytes = (scored_here / "scores.csv").read_bytes()
    os.mkfifo(tmp_path / "scores.csv")
    writer = feed(tmp_path / "scores.csv", scores_bytes)
    code, out, err = cli("review", tmp_path / "scores.csv", "-o", tmp_path / "r", "--top", "3", "--json", "-q",
                         "--image-root", scored_here)
    writer.join()
    assert code == 0, err
    assert json.loads(out)["inputs"]["scores"]["sha256"] == hashlib.sha256(scores_bytes).hexdigest()
    review_bytes = (tmp_path / "r" / "review.csv").read_bytes()
    manifest_bytes = (scored_here / "m.csv").read_bytes()
    os.mkfifo(tmp_path / "reviewed.csv")
    os.mkfifo(tmp_path / "m.csv")
    writers = [feed(tmp_path / "reviewed.csv", review_bytes), feed(tmp_path / "m.csv", manifest_bytes)]
    code, out, err = cli("apply", tmp_path / "reviewed.csv", tmp_path / "m.csv", "-o", tmp_path / "out" / "fixed.csv",
                         "--json", "-q")
    for writer in writers:
        writer.join()
    assert code == 0, err
    inputs = json.loads(out)["inputs"]
    assert inputs["reviewed"]["sha256"] == hashlib.sha256(review_bytes).hexdigest()
    assert inputs["manifest"]["sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert len(pd.read_csv(tmp_path / "out" / "fixed.csv")) == len(pd.read_csv(scored_here / "m.csv"))
