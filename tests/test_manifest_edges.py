"""Manifests from elsewhere: paths outside the manifest's folder, odd encodings and shapes — read right or refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from test_errors import assert_clean_failure, manifest_copy

from irank.formats.manifest import check_inside_root, read_manifest
from irank.runtime.errors import ManifestError


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_outside_the_manifest_folder_need_the_flag(cli, tiny_data, tiny_model, tmp_path, kind):
    inner = tmp_path / "inner"
    inner.mkdir()
    manifest = manifest_copy(tiny_data, inner)
    table = pd.read_csv(manifest)
    outside = tmp_path / "outside.png"
    outside.write_bytes((inner / table.loc[3, "path"]).read_bytes())
    if kind == "dotdot":
        table.loc[3, "path"] = "../outside.png"
    elif kind == "absolute":
        table.loc[3, "path"] = str(outside)
    else:
        os.symlink(outside, inner / "link.png")
        table.loc[3, "path"] = "link.png"
    table.to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "row 4", "outside the manifest's folder",
                         "--allow-outside-root", output=out)
    code, _, err = cli("score", tiny_model, manifest, "-o", out, "-q", "--allow-outside-root")
    assert code == 0, err


def test_dotdot_after_a_symlinked_folder_resolves_through_the_link(tmp_path):
    # `link/../x.png` is `x.png` to a lexical normalizer but the target's sibling to open(): the check
    # must follow the link the way open() does.
    (tmp_path / "elsewhere" / "deep" / "dir").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep" / "x.png").write_text("x")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "elsewhere" / "deep" / "dir", root / "link")
    (root / "x.png").write_text("x")
    (root / "m.csv").write_text("path,label\nx.png,a\nlink/x.png,a\nlink/../x.png,b\n")
    with pytest.raises(ManifestError, match="row 2: path 'link/x.png' resolves outside"):
        check_inside_root(read_manifest(root / "m.csv"))
    (root / "m.csv").write_text("path,label\nx.png,a\nlink/../x.png,b\n")
    with pytest.raises(ManifestError, match="row 2: path 'link/../x.png' resolves outside"):
        check_inside_root(read_manifest(root / "m.csv"))
    (root / "m.csv").write_text("path,label\nx.png,a\nsub/../x.png,b\n")
    (root / "sub").mkdir()
    check_inside_root(read_manifest(root / "m.csv"))


def test_a_symlink_loop_is_reported_with_its_row(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    table = pd.read_csv(manifest)
    table.loc[2, "path"] = "a.png"
    table.to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "a.png", "row 3", output=out)


def test_a_manifest_that_is_a_symlink_loop(cli, tiny_model, tmp_path):
    os.symlink(tmp_path / "loop.csv", tmp_path / "loop.csv")
    assert_clean_failure(cli("score", tiny_model, tmp_path / "loop.csv", "-o", tmp_path / "s.csv"), "loop.csv")


def write(tmp_path: Path, data: bytes, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"path,label\n", "no rows"),
    (b"path,label\r\n", "no rows"),
    (b"name,kind\na.png,x\n", "missing column"),
    (b"path,label\na.png,caf\xe9\n", "UTF-8"),
    (b'path,label\n"a.png,x\n', "cannot parse"),
])
def test_bad_manifests_are_refused_in_one_line(tmp_path, data, needle):
    with pytest.raises(ManifestError, match=needle) as caught:
        read_manifest(write(tmp_path, data))
    assert "\n" not in str(caught.value) and "m.csv" in str(caught.value)


def test_bom_crlf_and_quoted_commas_are_read_right(tmp_path):
    data = '\ufeffpath,label,note\r\n"a,1.png",cat,"said ""hi"", twice"\r\nb.png,dog,\r\n'.encode()
    manifest = read_manifest(write(tmp_path, data))
    assert list(manifest.table.columns) == ["path", "label", "note"]
    assert manifest.paths == ["a,1.png", "b.png"] and manifest.labels == ["cat", "dog"]
    assert manifest.table["note"].tolist() == ['said "hi", twice', ""]
    check_inside_root(manifest)


def test_jsonl_and_tsv_with_bom(tmp_path):
    tsv = read_manifest(write(tmp_path, "\ufeffpath\tlabel\r\na.png\tcat\r\n".encode(), "m.tsv"))
    assert tsv.paths == ["a.png"] and tsv.labels == ["cat"]
    jsonl = read_manifest(write(tmp_path, b'{"path": "a.png", "label": 3}\n{"path": "b.png", "label": 1}\n', "m.jsonl"))
    assert jsonl.labels == ["3", "1"]


def test_a_lone_carriage_return_in_a_value_survives_write_and_read(tmp_path):
    import pandas as pd

    from irank.formats.manifest import read_table, write_table

    table = pd.DataFrame({"path": ["0", "1"], "label": ["0", "1"], "note": ["\r0", "plain"]})
    write_table(table, tmp_path / "m.csv")
    pd.testing.assert_frame_equal(read_table(tmp_path / "m.csv"), table)


def test_resolved_image_paths_are_the_files_each_row_names(tmp_path):
    """`resolved_paths` resolves a row's file when it is read (no million Path objects held): it must give
    what a list of resolved paths gave, for relative and absolute rows, by index, slice and iteration."""
    from irank.formats.manifest import read_manifest

    absolute = tmp_path / "elsewhere" / "c.png"
    (tmp_path / "m.csv").write_text(f"path,label\nimg/a.png,x\nimg/sub/b.png,y\n{absolute},x\n")
    manifest = read_manifest(tmp_path / "m.csv")
    paths = manifest.resolved_paths()
    expected = [tmp_path.resolve() / "img/a.png", tmp_path.resolve() / "img/sub/b.png", absolute]
    assert list(paths) == expected and len(paths) == 3
    assert paths[-1] == absolute and paths[1:] == expected[1:]
    assert manifest.resolved_paths() is paths  # built once
