"""Annotators' work is never deleted: `review --overwrite` replaces a pack only while it holds exactly the files
irank wrote, each unchanged; a review.csv saved by a spreadsheet (another separator, encoding, quoting, column
order) is read by `apply` and keeps its pack from being replaced."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_errors import assert_clean_failure

import irank

CLASSES = ["cross", "disk", "hstripes", "vstripes"]


@pytest.fixture(scope="module")
def scored(tiny_data, tiny_model, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("trust-scores") / "scores.csv")
    irank.score(tiny_model, tiny_data["train"], output=output, run_options=irank.RunOptions(device="cpu", num_workers=0))
    return output


@pytest.fixture
def pack(cli, scored, tmp_path) -> Path:
    folder = tmp_path / "pack"
    code, _, err = cli("review", scored, "-o", folder, "--top", "5", "-q")
    assert code == 0, err
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (recursively, links not followed): its bytes, None for a folder or a link."""
    found = {}
    for path in sorted(folder.rglob("*")):
        found[str(path.relative_to(folder))] = None if path.is_symlink() or path.is_dir() else path.read_bytes()
    return found


def review_rows(pack: Path) -> list[list[str]]:
    with open(pack / "review.csv", newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def spreadsheet_bytes(rows: list[list[str]], *, separator: str = ",", encoding: str = "utf-8", quote_all=False,
                      line_end: str = "\r\n", hint: bool = False) -> bytes:
    """`rows` as a spreadsheet saves a CSV: its separator, encoding (a BOM where the codec writes one), quoting,
    line ends, and Excel's `sep=` first line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=separator, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
                        lineterminator=line_end)
    writer.writerows(rows)
    text = (f"sep={separator}{line_end}" if hint else "") + buffer.getvalue()
    return (codecs.BOM_UTF8 if encoding == "utf-8-sig" else b"") + text.encode("utf-8" if encoding == "utf-8-sig" else encoding)


def with_decision(rows: list[list[str]], place: int = 1, decision: str = "remove", new_label: str = "") -> list[list[str]]:
    rows = [list(row) for row in rows]
    header = rows[0]
    rows[place][header.index("decision")] = decision
    rows[place][header.index("new_label")] = new_label
    return rows


def reordered(rows: list[list[str]]) -> list[list[str]]:
    """decision and new_label moved to the end, the rest reversed: a column order a spreadsheet user made."""
    header = rows[0]
    order = [i for i in reversed(range(len(header))) if header[i] not in ("decision", "new_label")]
    order += [header.index("decision"), header.index("new_label")]
    return [[row[i] for i in order] for row in rows]


SAVED_FORMS = {
    "excel-semicolon-cp1252": dict(separator=";", encoding="cp1252"),
    "excel-unicode-text": dict(separator="\t", encoding="utf-16"),
    "utf-8-bom-quoted": dict(encoding="utf-8-sig", quote_all=True),
    "sep-hint": dict(separator=";", hint=True, line_end="\n"),
    "utf-16-be-no-bom": dict(separator=",", encoding="utf-16-be"),
}


@pytest.mark.parametrize("form", sorted(SAVED_FORMS))
@pytest.mark.parametrize("shape", ["as-written", "reordered"])
def test_decisions_saved_by_a_spreadsheet_keep_the_pack(cli, scored, pack, form, shape):
    rows = with_decision(review_rows(pack), 2, "relabel", "disk")
    (pack / "review.csv").write_bytes(spreadsheet_bytes(reordered(rows) if shape == "reordered" else rows,
                                                        **SAVED_FORMS[form]))
    before = snapshot(pack)
    assert_clean_failure(cli("review", scored, "-o", pack, "--top", "7", "--overwrite"),
                         str(pack), "review.csv has 1 rows filled in by an annotator", "--overwrite or not")
    assert snapshot(pack) == before


@pytest.mark.parametrize("form", sorted(SAVED_FORMS))
def test_apply_reads_a_review_csv_a_spreadsheet_saved(cli, pack, tiny_data, tmp_path, form):
    rows = review_rows(pack)
    given = rows[1][rows[0].index("label")]
    target = next(name for name in CLASSES if name != given)
    rows = with_decision(with_decision(rows, 1, "Relabel ", f" {target}"), 2, "remove")
    (pack / "review.csv").write_bytes(spreadsheet_bytes(reordered(rows), **SAVED_FORMS[form]))
    manifest = tmp_path / "train.csv"
    shutil.copyfile(tiny_data["train"], manifest)
    code, out, err = cli("apply", pack / "review.csv", manifest, "-o", tmp_path / "fixed.csv", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["relabeled"], summary["removed"], summary["kept"]) == (1, 1, 3)
    fixed = pd.read_csv(tmp_path / "fixed.csv", dtype=str, keep_default_na=False).set_index("path")
    ids = [row[rows[0].index("id")] for row in rows[1:]]
    assert fixed.loc[ids[0], "label"] == target and ids[1] not in fixed.index


@pytest.mark.parametrize("change, reason", [
    (lambda pack: (pack / "review.csv").write_bytes(spreadsheet_bytes(review_rows(pack), separator=";")),
     "review.csv was changed since irank wrote it"),
    (lambda pack: (pack / "review.csv").write_bytes(b"\x00\xff\xfe garbage"), "review.csv was changed"),
    (lambda pack: (pack / "project-export.json").write_text("[]"), "files irank did not write (project-export.json)"),
    (lambda pack: (pack / "notes.txt").write_text("ask Sam about row 3"), "files irank did not write (notes.txt)"),
    (lambda pack: (pack / ".~lock.review.csv#").write_text("lock"), "files irank did not write (.~lock.review.csv#)"),
    (lambda pack: (pack / "~$review.csv").write_text("lock"), "files irank did not write (~$review.csv)"),
    (lambda pack: (pack / "done").mkdir(), "files irank did not write (done)"),
    (lambda pack: (pack / "review.csv").rename(pack / "review-done.csv"), "files irank did not write (review-done.csv)"),
    (lambda pack: (pack / "review.csv").unlink(), "its review.csv is missing"),
    (lambda pack: (pack / "index.html").write_text("<p>my notes</p>"), "its index.html was changed"),
    (lambda pack: (pack / "label-studio.json").write_text("[]"), "its label-studio.json was changed"),
    (lambda pack: relink(pack / "review.csv"), "its review.csv is not the file irank wrote"),
    (lambda pack: edit_json(pack / "review.json", classes=["cat"]), "its review.json was changed"),
    (lambda pack: (pack / "review.json").write_text(
        json.dumps({**json.loads((pack / "review.json").read_text()), "classes": ["cat"]})), "its review.json was changed"),
    (lambda pack: (pack / "review.json").write_text("[1, 2"), "its review.json cannot be read"),
    (lambda pack: (pack / "review.json").write_text("[]"), "not one irank review wrote"),
    (lambda pack: (pack / "review.json").unlink(), "not an irank review pack"),
])
def test_a_pack_anyone_touched_is_never_replaced(cli, scored, pack, change, reason):
    change(pack)
    before = snapshot(pack)
    for overwrite in ([], ["--overwrite"]):
        assert_clean_failure(cli("review", scored, "-o", pack, "--top", "7", *overwrite), str(pack), reason)
        assert snapshot(pack) == before
    assert not [p for p in pack.parent.iterdir() if p.name.startswith(".pack.")]  # no folder built and left


def relink(path: Path) -> None:
    """Replace a file by a symlink to an identical copy elsewhere: same bytes, but not the file irank wrote."""
    copy = path.parent.parent / "elsewhere.csv"
    shutil.copyfile(path, copy)
    path.unlink()
    os.symlink(copy, path)


def edit_json(path: Path, **changes) -> None:
    """Edit review.json and write it back in irank's own layout, so only the recorded hash can tell."""
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def test_an_untouched_pack_is_replaced_only_with_overwrite(cli, scored, pack):
    assert_clean_failure(cli("review", scored, "-o", pack, "--top", "7"), "already holds a review pack", "--overwrite")
    assert len(review_rows(pack)) == 6
    for top in ("7", "3"):  # the replacement is itself replaceable: its files are recorded too
        code, _, err = cli("review", scored, "-o", pack, "--top", top, "-q", "--overwrite")
        assert code == 0, err
        assert len(review_rows(pack)) == int(top) + 1
    record = json.loads((pack / "review.json").read_text())
    assert sorted(record["files"]) == ["index.html", "label-studio.json", "label-studio.xml", "review.csv"]
    assert "files" not in irank.review(scored, output=str(pack), top=2, overwrite=True).summary


def test_a_pack_from_before_the_recorded_hashes(cli, scored, pack):
    """review.json without the files' hashes (an earlier irank): replaced only while its review.csv, read in any
    form, has a decision column and no decision, and the folder holds nothing else."""
    record = json.loads((pack / "review.json").read_text())
    for key in ("files", "review_json_sha256"):
        record.pop(key)
    (pack / "review.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    rows = review_rows(pack)
    (pack / "review.csv").write_bytes(spreadsheet_bytes(with_decision(rows, 3, "keep"), separator="\t", encoding="utf-16"))
    assert_clean_failure(cli("review", scored, "-o", pack, "--overwrite"), "review.csv has 1 rows filled in")
    (pack / "review.csv").write_bytes(spreadsheet_bytes([row[:2] + row[4:] for row in rows]))  # decision column gone
    assert_clean_failure(cli("review", scored, "-o", pack, "--overwrite"), "cannot be read as a table with a decision column")
    (pack / "review.csv").write_bytes(spreadsheet_bytes(rows, separator=";", encoding="cp1252"))
    code, _, err = cli("review", scored, "-o", pack, "--top", "4", "--overwrite", "-q")
    assert code == 0, err
    assert len(review_rows(pack)) == 5


def test_an_output_that_is_a_file_or_a_link_to_one_is_refused(cli, scored, tmp_path):
    (tmp_path / "file").write_text("mine")
    os.symlink(tmp_path / "file", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("file", "link", "dangling"):
        assert_clean_failure(cli("review", scored, "-o", tmp_path / name, "--overwrite"), "exists and is not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_user_column_named_like_irank_s_does_not_hide_the_decisions(cli, pack, tiny_data, tmp_path):
    """A spreadsheet user's own 'ID' and 'Decision' columns, put first: irank's exact-named columns still decide."""
    rows = with_decision(review_rows(pack), 1, "remove")
    rows = [["Decision", "ID"] + row for row in [rows[0]]] + [["keep", "nonsense"] + row for row in rows[1:]]
    (pack / "review.csv").write_bytes(spreadsheet_bytes(rows, separator=";"))
    code, out, err = cli("apply", pack / "review.csv", tiny_data["train"], "-o", tmp_path / "fixed.csv", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["removed"] == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(alphabet=',;\t"\r\n\'=abdeiloncs_ \ufeff\x00', max_size=80).map(str.encode))
def test_any_bytes_read_as_a_sheet_or_refused_with_a_reason(data):
    from irank.formats.sheet import read_sheet

    try:
        header, rows = read_sheet(data)
    except ValueError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert all(len(fields) == len(header) for _, fields in rows)
