"""Malformed JSON in any file a user hands irank — a JSON Lines manifest or scores table, a Label Studio export, a
scores sidecar, a pack's review.json — stops the command with exit code 3 and one line naming the file and the
place (line and column, or task), never a traceback; nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_errors import assert_clean_failure

import irank
from irank.formats.jsontext import JsonError, parse
from irank.formats.manifest import read_manifest
from irank.runtime.errors import ManifestError

GOOD = '{"path": "a.png", "label": "cat"}'
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("line, needles", [
    ("[1, 2]", ["line 2:", "a list, where each line must hold a JSON object"]),
    ("3", ["line 2:", "a number"]),
    ('"a.png"', ["line 2:", "a string"]),
    ("null", ["line 2:", "null"]),
    ("true", ["line 2:", "true or false"]),
    ('{"path": "b.png", "label": NaN}', ["line 2, column 28", "NaN is not a JSON number"]),
    ('{"path": "b.png", "label": -Infinity}', ["line 2, column 28", "-Infinity"]),
    ('{"path": "b.png", "path": "c.png", "label": "dog"}', ["line 2, column 19", "the key 'path' appears twice"]),
    ('{"path": "b.png", "label": "dog", "n": ' + "9" * 5000 + "}", ["line 2, column 40", "a number of 5000 digits"]),
    ('{"path": "b.png", "label": "dog", "n": 1e999}', ["line 2, column 40", "too large for a float"]),
    ('{"path": "b.png", "label": "dog", "deep": ' + DEEP + "}", ["line 2, column 100042", "nested 100001 levels deep"]),
    ('{"path": "b.png", "label": "dog",}', ["line 2, column 34", "not JSON"]),
    ('{"path": "b.png", "label": "\\ud800"}', ["line 2, column 29", "lone UTF-16 surrogate"]),
    ('{"path": "b.png"', ["line 2, column", "not JSON"]),
])
def test_a_bad_jsonl_manifest_line_is_named(cli, tiny_model, tmp_path, line, needles):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(GOOD + "\n" + line + "\n" + GOOD.replace("a.png", "z.png") + "\n", encoding="utf-8")
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "m.jsonl", *needles, output=out)


@pytest.mark.parametrize("data, needles", [
    (b"", ["the file is empty"]),
    (b"\n  \n\n", ["the file is empty"]),
    (GOOD.encode() + b"\n{\"path\": \"b\xff.png\", \"label\": \"x\"}\n", ["line 2", "not valid UTF-8"]),
    (b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n[]\r\n", ["line 2", "a list"]),
])
def test_empty_and_undecodable_jsonl_is_named(tmp_path, data, needles):
    (tmp_path / "m.jsonl").write_bytes(data)
    with pytest.raises(ManifestError) as caught:
        read_manifest(tmp_path / "m.jsonl")
    assert "m.jsonl" in str(caught.value) and "\n" not in str(caught.value)
    for needle in needles:
        assert needle in str(caught.value)


def test_a_jsonl_manifest_with_a_bom_crlf_and_blank_lines_is_read(tmp_path):
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n\r\n" + b'{"label": "dog", "path": "b.png"}\r\n')
    manifest = read_manifest(tmp_path / "m.jsonl")
    assert list(manifest.paths) == ["a.png", "b.png"] and list(manifest.labels) == ["cat", "dog"]


def test_a_jsonl_line_missing_the_label_is_an_empty_label_not_nan(tmp_path):
    (tmp_path / "m.jsonl").write_text(GOOD + '\n{"path": "b.png"}\n')
    with pytest.raises(ManifestError, match="row 2 has an empty label"):
        read_manifest(tmp_path / "m.jsonl")


def test_a_bad_jsonl_scores_table_is_named_by_review(cli, tmp_path):
    scores = tmp_path / "s.jsonl"
    scores.write_text('{"rank": 1, "id": "a", "label": "x", "class_rank": 1, "score": 1.0}\n{"rank": 2,}\n')
    assert_clean_failure(cli("review", scores, "-o", tmp_path / "r"), "s.jsonl", "line 2, column 12",
                         output=tmp_path / "r")


# Label Studio exports

@pytest.fixture(scope="module")
def pack(tiny_data, tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("json-pack")
    irank.score(tiny_model, tiny_data["train"], output=str(folder / "scores.csv"),
                run_options=irank.RunOptions(device="cpu", num_workers=0))
    irank.review(str(folder / "scores.csv"), output=str(folder / "review"), top=3)
    return folder / "review"


def annotated(pack: Path, **changes) -> list:
    tasks = json.loads((pack / "label-studio.json").read_text())
    tasks[0]["annotations"] = [{"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                            "value": {"choices": ["disk"]}}]}]
    for path, value in changes.items():
        *keys, last = path.split("__")
        target = tasks
        for key in keys:
            target = target[int(key) if key.isdigit() else key]
        target[int(last) if last.isdigit() else last] = value
    return tasks


@pytest.mark.parametrize("export, needles", [
    ('{"tasks": []}', ["holds an object; a Label Studio export is a JSON list of tasks"]),
    ("[1]", ["task 1 is a number, not an object"]),
    ('[{"data": []}]', ["task 1: data is a list, not an object"]),
    ('[{"data": {"irank_id": 7, "given_label": "disk"}}]', ["task 1, data: irank_id is a number, not a string"]),
    ('[{"data": {"irank_id": ["a"], "given_label": "disk"}}]', ["task 1, data: irank_id is a list"]),
    ('[{"data": {"irank_id": "a", "given_label": true}}]', ["task 1, data: given_label is true or false"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk"}, "annotations": {"result": []}}]',
     ["task 1: annotations is an object, not a list"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk"}, "annotations": ["remove"]}]',
     ["task 1: annotation 1 is a string, not an object"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk"}, "annotations": [{"result": {"x": 1}}]}]',
     ["task 1, annotation 1: result is an object, not a list"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk"}, "annotations": [{"result": [3]}]}]',
     ["task 1, annotation 1: result 1 is a number, not an object"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk"}, "annotations": [{"result": [{"from_name": "label", "value": []}]}]}]',
     ["task 1, annotation 1, result 1: value is a list, not an object"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk"}, "annotations": [{"result": [{"from_name": "label", "value": {"choices": "disk"}}]}]}]',
     ["value: choices is a string, not a list"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk"}, "annotations": [{"result": [{"from_name": "label", "value": {"choices": [1]}}]}]}]',
     ["value.choices must be a list of strings"]),
    ('[{"data": {"irank_id": "a", "given_label": "disk", "irank_id": "b"}}]', ["line 1, column 52", "the key 'irank_id' appears twice"]),
    ('[\n  {"data": {"irank_id": "a", "given_label": NaN}}\n]', ["line 2, column 45", "NaN is not a JSON number"]),
    ("[\n  {},\n]", ["line 3, column 1", "not JSON"]),
    ("[" + DEEP + "]", ["line 1, column", "nested 100001 levels deep"]),
    ("", ["line 1, column 1", "not JSON"]),
])
def test_a_label_studio_export_of_the_wrong_shape_is_named(cli, pack, tiny_data, tmp_path, export, needles):
    (tmp_path / "export.json").write_text(export, encoding="utf-8")
    out = tmp_path / "fixed.csv"
    assert_clean_failure(cli("apply", tmp_path / "export.json", tiny_data["train"], "-o", out), "export.json", *needles,
                         output=out)


def test_a_label_studio_export_in_another_encoding_is_named(cli, pack, tiny_data, tmp_path):
    (tmp_path / "export.json").write_bytes((pack / "label-studio.json").read_text().encode("utf-16"))
    out = tmp_path / "fixed.csv"
    assert_clean_failure(cli("apply", tmp_path / "export.json", tiny_data["train"], "-o", out), "export.json",
                         "not valid UTF-8", output=out)


def test_a_well_formed_export_still_applies(cli, pack, tiny_data, tmp_path):
    (tmp_path / "export.json").write_text(json.dumps(annotated(pack)))
    code, out, err = cli("apply", tmp_path / "export.json", tiny_data["train"], "-o", tmp_path / "fixed.csv", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["reviewed_rows"] == 3


# The JSON files irank reads beside others

@pytest.mark.parametrize("text, needles", [
    ("[1, 2]", ["holds a list, not the JSON object irank score writes"]),
    ('{"classes": "cat"}', ["classes must be a list of class names (strings); found a string"]),
    ('{"classes": ["cat", 1]}', ["found a number"]),
    ('{"inputs": {"manifest": "m.csv"}}', ["inputs.manifest is a string, not an object"]),
    ('{"inputs": {"manifest": {"path": 3}}}', ["inputs.manifest.path is a number, not a string"]),
    ('{"inputs": []}', ["inputs is a list, not an object"]),
    ('{"classes": [],\n "classes": ["a"]}', ["line 2, column 2", "the key 'classes' appears twice"]),
    (DEEP, ["line 1, column", "nested 100000 levels deep"]),
])
def test_a_bad_scores_sidecar_is_named_by_review(cli, pack, tmp_path, text, needles):
    scores = tmp_path / "scores.csv"
    shutil.copyfile(pack.parent / "scores.csv", scores)
    (tmp_path / "scores.csv.json").write_text(text)
    out = tmp_path / "r"
    assert_clean_failure(cli("review", scores, "-o", out), "scores.csv.json", *needles, output=out)


@pytest.mark.parametrize("text, needles", [
    ("[]", ["holds a list, not the JSON object irank review writes"]),
    ('{"classes": {"a": 1}}', ["classes must be a list of class names"]),
    ('{"classes": [\n  "a",\n  "a" "b"]}', ["line 3, column 7", "not JSON"]),
])
def test_a_bad_review_json_beside_the_reviewed_file_is_named_by_apply(cli, pack, tiny_data, tmp_path, text, needles):
    shutil.copyfile(pack / "review.csv", tmp_path / "review.csv")
    (tmp_path / "review.json").write_text(text)
    out = tmp_path / "fixed.csv"
    assert_clean_failure(cli("apply", tmp_path / "review.csv", tiny_data["train"], "-o", out), "review.json", *needles,
                         output=out)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='[]{}",:0123456789.eE+-tfnrulaNIy \\\n', max_size=60))
def test_strict_json_parses_or_says_where(text):
    """Any text: a value, or JsonError with a message — never another exception."""
    try:
        parse(text)
    except JsonError as error:
        assert error.message and "\n" not in error.message


@pytest.mark.parametrize("value, shown", [("[1, 2]", "a list"), ('{"a": 1}', "an object"), ("true", "true or false")])
@pytest.mark.parametrize("key", ["path", "label", "id", "index"])
def test_a_jsonl_field_irank_reads_as_text_must_be_a_string_or_a_number(tmp_path, key, value, shown):
    line = {"path": '"b.png"', "label": '"dog"', "id": '"b"', "index": "0", key: value}
    (tmp_path / "m.jsonl").write_text(GOOD + "\n{" + ", ".join(f'"{k}": {v}' for k, v in line.items()) + "}\n")
    with pytest.raises(ManifestError, match=f"m.jsonl: line 2: {key} is {shown}; irank reads {key} as text"):
        read_manifest(tmp_path / "m.jsonl")


def test_nan_that_python_s_json_wrote_into_irank_s_own_files_is_read(cli, pack, tmp_path):
    """A sidecar (or review.json, or checkpoint metadata) irank wrote may hold NaN or Infinity, as Python's json
    writes a diverged loss: read back, not refused."""
    scores = tmp_path / "scores.csv"
    shutil.copyfile(pack.parent / "scores.csv", scores)
    sidecar = json.loads((pack.parent / "scores.csv.json").read_text())
    sidecar["parameters"]["note"] = [float("nan"), float("inf")]
    (tmp_path / "scores.csv.json").write_text(json.dumps(sidecar))
    code, _, err = cli("review", scores, "-o", tmp_path / "r", "--top", "2", "-q")
    assert code == 0, err


@pytest.mark.parametrize("metadata, needles", [
    ("[1]", ["its irank metadata is a list, not a JSON object"]),
    (DEEP, ["its irank metadata is not valid JSON", "nested 100000 levels deep"]),
    ('{"arch": "tiny-cnn", "arch": "x"}', ["line 1, column 22", "the key 'arch' appears twice"]),
])
def test_a_checkpoint_with_malformed_irank_metadata_is_named(cli, tiny_model, tiny_data, tmp_path, metadata, needles):
    from safetensors.torch import load_file, save_file

    save_file(load_file(tiny_model), str(tmp_path / "bad.safetensors"), metadata={"irank": metadata})
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tmp_path / "bad.safetensors", tiny_data["train"], "-o", out), "bad.safetensors",
                         *needles, output=out)


def test_a_checkpoint_whose_history_holds_nan_loads(tiny_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from irank.model.checkpoint import read_checkpoint

    with safe_open(tiny_model, "pt") as handle:
        metadata = json.loads(handle.metadata()["irank"])
    metadata["history"] = [{"loss": float("nan")}, {"loss": float("inf")}]
    save_file(load_file(tiny_model), str(tmp_path / "nan.safetensors"), metadata={"irank": json.dumps(metadata)})
    assert read_checkpoint(str(tmp_path / "nan.safetensors")).metadata["arch"] == metadata["arch"]
