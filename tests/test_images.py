"""Bad image files are reported with their row, and nothing is written; a decompression bomb is never decoded."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from test_errors import assert_clean_failure, manifest_copy


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height RGB pixels, with one tiny IDAT: decoding it would need gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def with_bad_image(tiny_data, folder: Path, data: bytes, name: str, row: int = 9) -> Path:
    manifest = manifest_copy(tiny_data, folder)
    (folder / name).write_bytes(data)
    table = pd.read_csv(manifest)
    table.loc[row, "path"] = name
    table.to_csv(manifest, index=False)
    return manifest


@pytest.mark.parametrize("name,data", [
    ("zero.png", b""),
    ("truncated.png", None),  # the first 60 bytes of a real image
    ("text.png", b"just some text, not an image\n"),
    ("wrong-format.png", b"GIF89a\x01\x00\x01\x00broken"),
])
def test_bad_image_files_are_named_with_their_row(cli, tiny_data, tiny_model, tmp_path, name, data):
    if data is None:
        first = pd.read_csv(tiny_data["train"])["path"][0]
        data = (Path(tiny_data["folder"]) / first).read_bytes()[:60]
    manifest = with_bad_image(tiny_data, tmp_path, data, name)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), name, "row 10", output=out)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_decompression_bomb_is_refused_not_decoded(cli, tiny_data, tiny_model, tmp_path, workers):
    manifest = with_bad_image(tiny_data, tmp_path, png_header_claiming(100_000, 100_000), "bomb.png")
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out, "--num-workers", workers),
                         "bomb.png", "row 10", "refused, not decoded", "IRANK_MAX_IMAGE_PIXELS", output=out)


def test_the_pixel_limit_is_configurable(cli, tiny_data, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("IRANK_MAX_IMAGE_PIXELS", "100")  # a 16×16 image is 256 pixels: over the limit
    manifest = manifest_copy(tiny_data, tmp_path)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "row 1", "refused", output=out)


def test_augment_auto_crops_and_flips_images_of_a_known_size_and_only_flips_others():
    from irank.model.inputs import Preprocess, resolve_augment

    images = [Path("a.png")]
    assert resolve_augment("auto", images, Preprocess(image_size=32)) == "crop-flip"
    assert resolve_augment("auto", images, Preprocess()) == "flip"  # a random crop needs the size
    assert resolve_augment("none", images, Preprocess(image_size=32)) == "none"
