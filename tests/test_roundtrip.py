"""What irank writes, irank reads back unchanged: score → review → apply with no decision gives back the manifest
(byte for byte for a CSV or TSV irank wrote, value for value otherwise), whatever a cell holds; review.csv marks
cells a spreadsheet would run as formulas, and apply removes the marks."""

from __future__ import annotations

import csv
import html
import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import irank
from irank.formats.manifest import read_table, write_table
from irank.formats.sheet import mark, needs_mark, unmark

# The model's classes: what a spreadsheet would run, a separator, a quote, a line break, spaces, an apostrophe.
CLASSES = ["=cmd|' /C calc'!A0", 'a,b"c', "x\r\ny", " sp ", "'quoted"]
DIM = 4
ROUNDS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """linear-4 trained on 40 rows of one .npy, its classes named as in CLASSES."""
    folder = tmp_path_factory.mktemp("roundtrip-model")
    rng = np.random.default_rng(0)
    labels = np.arange(40) % len(CLASSES)
    values = rng.normal(size=(40, DIM)).astype(np.float32)
    values[np.arange(40), labels % DIM] += 3
    np.save(folder / "x.npy", values)
    write_table(pd.DataFrame({"path": "x.npy", "label": [CLASSES[i] for i in labels], "index": range(40)}),
                folder / "train.csv")
    irank.train(f"linear-{DIM}", str(folder / "train.csv"), output=str(folder / "model.safetensors"),
                train_options=irank.TrainOptions(scope="full", epochs=2, lr=0.05, seed=0),
                run_options=irank.RunOptions(device="cpu", batch_size=32))
    return {"checkpoint": folder / "model.safetensors", "values": folder / "x.npy"}


def run_round_trip(cli, model: dict, folder: Path, table: pd.DataFrame, suffix: str) -> tuple[Path, Path]:
    """Write `table` as irank writes manifests, then score → review (every row) → apply with no decision."""
    for name in set(table["path"]):
        shutil.copyfile(model["values"], folder / name)
    manifest = folder / f"manifest{suffix}"
    write_table(table, manifest)
    code, _, err = cli("score", model["checkpoint"], manifest, "-o", folder / "scores.csv", "-q", "--boundary", "head")
    assert code == 0, err
    code, _, err = cli("review", folder / "scores.csv", "-o", folder / "pack", "--fraction", "1", "-q")
    assert code == 0, err
    fixed = folder / f"fixed{suffix}"
    code, _, err = cli("apply", folder / "pack" / "review.csv", manifest, "-o", fixed, "-q")
    assert code == 0, err
    return manifest, fixed


# Cell text: anything a file can hold but a lone surrogate, often starting the way a formula or a quoted
# field does.
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)
tricky_start = st.sampled_from(["", "=", "+", "-", "@", "'", "''", "\t", "\r", "\n", " ", '"', ",", "\ufeff", "0", "-1"])
cell = st.builds(lambda start, rest: start + rest, tricky_start, any_text)
nonblank = cell.filter(lambda text: text and not text.isspace())
file_stem = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                    max_size=20).filter(lambda stem: len((stem + ".npy").encode()) < 200)
column_name = cell.filter(lambda name: name not in ("id", "path", "label", "index", "key")
                          and not name.startswith("\ufeff"))


@st.composite
def manifests(draw) -> pd.DataFrame:
    rows = draw(st.integers(1, 6))
    files = draw(st.lists(file_stem, min_size=1, max_size=2, unique=True))
    table = pd.DataFrame({
        "path": [draw(st.sampled_from(files)) + ".npy" for _ in range(rows)],
        "label": [draw(st.sampled_from(CLASSES + [str(index) for index in range(len(CLASSES))])) for _ in range(rows)],
        "index": [str(index) for index in draw(st.lists(st.integers(0, 39), min_size=rows, max_size=rows))],
    })
    if draw(st.booleans()):
        table.insert(0, "id", draw(st.lists(nonblank, min_size=rows, max_size=rows, unique=True)))
    else:  # the default id, path[index], must not repeat
        table = table.drop_duplicates(["path", "index"]).reset_index(drop=True)
    names = draw(st.lists(column_name, max_size=3, unique=True))
    for name in names:
        table.insert(draw(st.integers(0, table.shape[1])), name, draw(st.lists(cell, min_size=len(table), max_size=len(table))))
    return table


@ROUNDS
@given(manifests())
@example(pd.DataFrame({"id": ["=1+1", "'=1+1", "-3", "@SUM(A1)", "a\rb"], "path": ["x\r.npy"] * 5,
                       "label": CLASSES, "index": ["0", "1", "2", "3", "4"], "": ["", " ", "\x00", "\t=2", "\n"],
                       "note\r": ["+x", "''", "'", "-", "é✓\u2028"]}))
def test_an_untouched_pack_applied_gives_back_the_csv_manifest_byte_for_byte(cli, model, table):
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        manifest, fixed = run_round_trip(cli, model, folder, table, ".csv")
        assert fixed.read_bytes() == manifest.read_bytes()
        scores = read_table(folder / "scores.csv", what="scores")
        check_review_csv(folder / "pack" / "review.csv", scores)
        check_page_and_tasks(folder / "pack", scores)


def check_review_csv(review_csv: Path, scores: pd.DataFrame) -> None:
    """No cell of review.csv starts a formula unmarked, and unmarking gives back the scores' text."""
    records = list(csv.reader(io.StringIO(review_csv.read_bytes().decode("utf-8"), newline="")))
    header, rows = records[0], records[1:]
    assert len(rows) == len(scores)
    for fields in [header, *rows]:
        for field in fields:
            assert not (field[:1] in "=+-@\t\r\n" and needs_mark(field)), field
    at = {unmark(name): place for place, name in enumerate(header)}
    assert [unmark(fields[at["id"]]) for fields in rows] == scores["id"].tolist()
    assert [unmark(fields[at["label"]]) for fields in rows] == scores["label"].tolist()
    for column in scores.columns:
        if column not in ("label_prob", "predicted_prob", "loss", "score", "candidate_2_prob", "candidate_3_prob"):
            assert [unmark(fields[at[column]]) for fields in rows] == scores[column].tolist(), column


def check_page_and_tasks(pack: Path, scores: pd.DataFrame) -> None:
    """The Label Studio tasks carry every id exactly; the page shows every id escaped."""
    tasks = json.loads((pack / "label-studio.json").read_text(encoding="utf-8"))
    assert [task["data"]["irank_id"] for task in tasks] == scores["id"].tolist()
    assert [task["data"]["given_label"] for task in tasks] == scores["label"].tolist()
    page = (pack / "index.html").read_bytes().decode("utf-8")
    for sample_id in scores["id"]:
        assert f'data-id="{html.escape(sample_id)}"' in page


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(manifests(), st.sampled_from([".tsv", ".jsonl", ".parquet"]))
def test_other_formats_come_back_value_for_value(cli, model, table, suffix):
    with tempfile.TemporaryDirectory() as name:
        manifest, fixed = run_round_trip(cli, model, Path(name), table, suffix)
        if suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(fixed), pd.read_parquet(manifest))
        elif suffix == ".jsonl":
            assert jsonl_values(fixed) == jsonl_values(manifest)
        else:
            assert fixed.read_bytes() == manifest.read_bytes()  # a TSV irank wrote: byte for byte too


def jsonl_values(path: Path) -> list:
    """Every line's value (split at line feeds only: U+2028 inside a string is no line end)."""
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]


@given(st.text())
def test_marking_is_undone_exactly_and_leaves_no_formula(text):
    marked = mark(text)
    assert unmark(marked) == text
    assert marked == text or marked == "'" + text
    if marked[:1] in ("=", "+", "-", "@"):
        assert float(marked) == float(marked)  # only a plain number is left as it is


@pytest.mark.parametrize("text, shown", [
    ("=1+1", "'=1+1"), ("+A1", "'+A1"), ("-A1", "'-A1"), ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"), (" =1", "' =1"), ("'x", "''x"), ("-3", "-3"), ("+1.5e-3", "+1.5e-3"), ("x=1", "x=1"), ("", ""),
])
def test_what_a_spreadsheet_would_run_is_marked(text, shown):
    assert mark(text) == shown


def test_a_decision_on_a_formula_like_id_reaches_its_row(cli, model, tmp_path):
    """The annotator relabels the row whose id is `=HYPERLINK(...)` in the marked review.csv: apply finds it."""
    table = pd.DataFrame({"id": ['=HYPERLINK("http://x","y")', "'lead", "plain"], "path": "x.npy",
                          "label": [CLASSES[0], CLASSES[1], CLASSES[2]], "index": ["0", "1", "2"]})
    manifest, _ = run_round_trip(cli, model, tmp_path, table, ".csv")
    review = pd.read_csv(tmp_path / "pack" / "review.csv", dtype=str, keep_default_na=False)
    assert set(review["id"]) == {'\'=HYPERLINK("http://x","y")', "''lead", "plain"}
    review.loc[review["id"] == '\'=HYPERLINK("http://x","y")', ["decision", "new_label"]] = ["relabel", mark(CLASSES[3])]
    review.loc[review["id"] == "''lead", "decision"] = "remove"
    review.to_csv(tmp_path / "pack" / "edited.csv", index=False)
    code, _, err = cli("apply", tmp_path / "pack" / "edited.csv", manifest, "-o", tmp_path / "out.csv", "--audit",
                       tmp_path / "audit.csv")
    assert code == 0, err
    out = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert out["id"].tolist() == ['=HYPERLINK("http://x","y")', "plain"]
    assert out["label"].tolist() == [CLASSES[3], CLASSES[2]]
    audit = pd.read_csv(tmp_path / "audit.csv", dtype=str, keep_default_na=False)
    assert set(audit["id"]) == set(table["id"])


def test_a_foreign_csv_comes_back_value_for_value(cli, model, tmp_path):
    """A CSV irank did not write (a byte-order mark, CRLF, every field quoted, a pandas index column with no name)
    comes back with the same columns and values, in irank's own spelling."""
    table = pd.DataFrame({"path": "x.npy", "label": CLASSES[:3], "index": ["0", "1", "2"], "note": ["a", "", " b "]})
    shutil.copyfile(model["values"], tmp_path / "x.npy")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + table.to_csv(quoting=csv.QUOTE_ALL, lineterminator="\r\n").encode())
    assert cli("score", model["checkpoint"], manifest, "-o", tmp_path / "s.csv", "-q")[0] == 0
    assert cli("review", tmp_path / "s.csv", "-o", tmp_path / "pack", "--top", "2", "-q")[0] == 0
    code, _, err = cli("apply", tmp_path / "pack" / "review.csv", manifest, "-o", tmp_path / "out.csv")
    assert code == 0, err
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == ["", "path", "label", "index", "note"]  # the unnamed column stays unnamed
    back = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    assert back.equals(pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8-sig"))


def test_jsonl_values_come_back_as_json_gave_them(cli, model, tmp_path):
    """Floats to the last digit, whole numbers past 2**53, nested values, null and unicode survive apply."""
    shutil.copyfile(model["values"], tmp_path / "x.npy")
    lines = [
        {"path": "x.npy", "label": CLASSES[0], "index": 0, "f": 0.12345678901234567, "big": 2**70, "nested": {"a": [1, None]},
         "slash": "a/b", "none": None, "u": "é\u2028✓"},
        {"path": "x.npy", "label": CLASSES[1], "index": 1, "f": -1e-300, "big": -(2**64), "nested": [], "slash": "",
         "none": None, "u": "="},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    assert cli("score", model["checkpoint"], manifest, "-o", tmp_path / "s.csv", "-q")[0] == 0
    assert cli("review", tmp_path / "s.csv", "-o", tmp_path / "pack", "-q")[0] == 0
    code, _, err = cli("apply", tmp_path / "pack" / "review.csv", manifest, "-o", tmp_path / "out.jsonl")
    assert code == 0, err
    assert jsonl_values(tmp_path / "out.jsonl") == lines


def test_a_key_a_jsonl_line_lacks_comes_back_as_null(cli, model, tmp_path):
    shutil.copyfile(model["values"], tmp_path / "x.npy")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "x.npy", "label": "\'quoted", "index": 0, "extra": 1}\n'
                        '{"path": "x.npy", "label": " sp ", "index": 1}\n', encoding="utf-8")
    assert cli("score", model["checkpoint"], manifest, "-o", tmp_path / "s.csv", "-q")[0] == 0
    assert cli("review", tmp_path / "s.csv", "-o", tmp_path / "pack", "-q")[0] == 0
    assert cli("apply", tmp_path / "pack" / "review.csv", manifest, "-o", tmp_path / "out.jsonl")[0] == 0
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n") == [
        '{"path":"x.npy","label":"\'quoted","index":0,"extra":1}', '{"path":"x.npy","label":" sp ","index":1,"extra":null}',
        ""]


@pytest.mark.parametrize("text, needles", [
    ("path,label,path\nx.npy,a,b\n", ["the header names the column 'path' twice", "columns 1 and 3"]),
    ("path,label\nx.npy,a,extra\nx.npy,b,more\n", ["row 1 has more fields than the header"]),
    ("path,label\nx.npy,a\nx.npy,b,more\n", ["cannot parse as csv", "line 3"]),
])
def test_a_csv_that_cannot_come_back_unchanged_is_refused(cli, model, tmp_path, text, needles):
    from test_errors import assert_clean_failure

    (tmp_path / "m.csv").write_text(text)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", model["checkpoint"], tmp_path / "m.csv", "-o", out), "m.csv", *needles, output=out)


def test_a_table_from_a_named_pipe_is_parsed_without_reading_ahead(tmp_path):
    """A table given by path may be a named pipe (prune reads its scores that way, `<(irank score ...)`), which gives
    its rows once: the header is not looked at before the parse there."""
    import os
    import signal
    import threading

    from irank.formats.manifest import iter_table

    text = "id,label,rank\n" + "".join(f"{i}.png,a,{i + 1}\n" for i in range(7))
    pipe = tmp_path / "s.csv"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text(text))
    writer.start()
    def stuck(*_):
        raise TimeoutError("blocked on the pipe")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)  # a second open of the pipe would wait for a writer forever
    try:
        table = pd.concat(list(iter_table(str(pipe), "csv", what="scores", name=str(pipe))))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if writer.is_alive():  # let the writer finish: open the pipe for reading once
            with open(pipe, "rb") as drain:
                drain.read()
        writer.join()
    assert table["id"].tolist() == [f"{i}.png" for i in range(7)]


def test_json_lines_irank_writes_are_json_it_reads_back(cli, model, tmp_path):
    """A Parquet manifest's infinite and missing floats, list columns and timestamps, written as JSON Lines by
    apply: valid JSON (±inf and NaN as null, as pandas wrote them), which irank's strict reader reads back."""
    shutil.copyfile(model["values"], tmp_path / "x.npy")
    table = pd.DataFrame({"path": "x.npy", "label": CLASSES[:3], "index": [0, 1, 2],
                          "f": [np.inf, np.nan, -0.5], "v": [np.array([1.0, np.nan]), np.array([]), np.array([2.5])],
                          "t": pd.to_datetime(["2020-01-01 00:00", None, "2021-06-30 12:00"], format="%Y-%m-%d %H:%M")})
    table.to_parquet(tmp_path / "m.parquet", index=False)
    assert cli("score", model["checkpoint"], tmp_path / "m.parquet", "-o", tmp_path / "s.jsonl", "-q")[0] == 0
    assert cli("review", tmp_path / "s.jsonl", "-o", tmp_path / "pack", "-q")[0] == 0
    code, _, err = cli("apply", tmp_path / "pack" / "review.csv", tmp_path / "m.parquet", "-o", tmp_path / "out.jsonl")
    assert code == 0, err
    assert jsonl_values(tmp_path / "out.jsonl") == [
        {"path": "x.npy", "label": CLASSES[0], "index": 0, "f": None, "v": [1.0, None], "t": "2020-01-01T00:00:00"},
        {"path": "x.npy", "label": CLASSES[1], "index": 1, "f": None, "v": [], "t": None},
        {"path": "x.npy", "label": CLASSES[2], "index": 2, "f": -0.5, "v": [2.5], "t": "2021-06-30T12:00:00"}]
    assert read_table(tmp_path / "out.jsonl")["label"].tolist() == CLASSES[:3]
