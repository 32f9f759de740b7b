"""Manifests read a block of rows at a time, held as compact columns, and scores tables written in rank
order through temporary files: the same results as reading and writing whole, at any block size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irank.formats import columns, synthetic
from irank.formats import manifest as manifest_module
from irank.formats import scores_table as rank_module
from irank.formats.columns import CodedColumn, TextColumn, first_duplicate, text_hashes
from irank.formats.manifest import read_manifest, write_table
from irank.formats.scores_table import RankedScores, prediction_columns, prediction_rows
from irank.runtime.errors import ManifestError
from irank.runtime.memory import DiskRows, MemoryBudget

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
strings = st.lists(st.text(max_size=6), max_size=30)


@FAST
@given(strings, st.data())
def test_text_and_coded_columns_hold_the_strings_they_were_given(values, data):
    rows = data.draw(st.lists(st.integers(0, max(len(values) - 1, 0)), max_size=10)) if values else []
    for column in (TextColumn.of(values), CodedColumn.of(values)):
        assert len(column) == len(values)
        assert list(column) == values and column == values and column[:] == values
        assert [column[i] for i in range(len(values))] == values
        if values:
            assert column[-1] == values[-1]
        assert list(column.take(rows)) == [values[i] for i in rows]
    assert sorted(CodedColumn.of(values).take(rows).values) == sorted(set(values[i] for i in rows))


@pytest.mark.parametrize("count, dtype", [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65_536, np.uint16),
                                          (65_537, np.int32)])
def test_codes_are_of_the_smallest_type_that_holds_them(count, dtype):
    values = [f"v{i}" for i in range(count)] + ["v0", f"v{count - 1}"]
    column = CodedColumn.of(values)
    assert column.codes.dtype == dtype and column[count] == "v0" and column[-1] == f"v{count - 1}"
    assert column[count - 1] == f"v{count - 1}" and len(column) == count + 2
    taken = column.take([count + 1, 0])
    assert list(taken) == [f"v{count - 1}", "v0"] and taken.codes.dtype == np.uint8


def test_columns_iterate_across_their_decoding_blocks(monkeypatch):
    monkeypatch.setattr(columns, "ITER_ROWS", 3)
    values = [f"é{i}" for i in range(10)]
    assert list(TextColumn.of(values)) == values == list(CodedColumn.of(values))


def naive_first_duplicate(values):
    first = {}
    for row, value in enumerate(values):
        if value in first:
            return first[value], row
        first[value] = row
    return None


@FAST
@given(st.lists(st.sampled_from(["a", "b", "c", "d", "ab", "é", ""]) | st.text(max_size=3), max_size=40),
       st.sampled_from(["real", "all collide", "half collide"]), st.sampled_from([1, 3, columns.ITER_ROWS]))
def test_the_duplicate_check_is_the_plain_definition_even_when_hashes_collide(monkeypatch, values, hashes, block_rows):
    """Whatever the hashes, and the blocks of rows in which the rows of repeated hashes are looked for."""
    monkeypatch.setattr(columns, "ITER_ROWS", block_rows)
    hashed = {"real": text_hashes(values),
              "all collide": np.zeros(len(values), dtype=np.uint64),
              "half collide": text_hashes(values) % np.uint64(2)}[hashes]
    assert first_duplicate(TextColumn.of(values), hashed) == naive_first_duplicate(values)


def write_rows(folder: Path, rows: list[dict], name: str = "m.csv") -> Path:
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_a_manifest_read_in_blocks_is_the_manifest_read_whole(tmp_path, monkeypatch, chunk):
    np.save(tmp_path / "e.npy", np.zeros((9, 2), dtype=np.float32))
    rows = [{"path": "e.npy", "label": f"c{i % 3}", "index": str(8 - i), "note": f"n,{i}"} for i in range(9)]
    whole = read_manifest(write_rows(tmp_path, rows))
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", chunk)
    blocks = read_manifest(tmp_path / "m.csv")
    assert (blocks.paths, blocks.labels, blocks.ids) == (whole.paths, whole.labels, whole.ids)
    assert blocks.tensor_index.tolist() == whole.tensor_index.tolist() == [8 - i for i in range(9)]
    assert blocks.table.equals(whole.table) and blocks.table["note"].tolist() == [f"n,{i}" for i in range(9)]
    assert [len(part) for _, part in blocks.chunks()] == [min(chunk, 9 - start) for start in range(0, 9, chunk)]


@pytest.mark.parametrize("row, change, message", [
    (6, {"label": " "}, "row 6 has an empty label"),
    (5, {"path": ""}, "row 5 has an empty path"),
    (7, {"index": "x"}, "row 7: index 'x' is not a whole number"),
    (4, {"path": "b.png"}, "row 4 ('b.png') points at an image but row 1 at a tensor file"),
    (8, {"index": "1"}, "duplicate id 'e.npy[1]' in rows 2 and 8"),
])
def test_errors_in_a_later_block_name_the_manifest_row(tmp_path, monkeypatch, row, change, message):
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 2)
    rows = [{"path": "e.npy", "label": "a", "index": str(i)} for i in range(9)]
    rows[row - 1].update(change)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        read_manifest(write_rows(tmp_path, rows))


def test_duplicate_ids_in_different_blocks_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 3)
    rows = [{"id": f"s{i}", "path": f"{i}.png", "label": "a"} for i in range(10)]
    rows[8]["id"] = "s2"
    with pytest.raises(ManifestError, match=r"duplicate id 's2' in rows 3 and 9"):
        read_manifest(write_rows(tmp_path, rows))
    rows = [{"path": f"{i}.png", "label": "a"} for i in range(10)]
    rows[9]["path"] = "0.png"
    with pytest.raises(ManifestError, match=r"duplicate id '0.png' in rows 1 and 10"):
        read_manifest(write_rows(tmp_path, rows))


@pytest.mark.parametrize("row, column, value, message", [
    (8, "id", "s2", "id 's2' appears twice"),
    (7, "rank", "x", "row 7: rank 'x' is not a number"),
    (9, "score", "", "row 9: score"),
])
def test_score_table_errors_in_a_later_block(tmp_path, monkeypatch, row, column, value, message):
    from irank.formats.manifest import TableSource
    from irank.formats.scores_table import flagged_rows, read_score_columns

    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 3)
    scores = pd.DataFrame({"id": [f"s{i}" for i in range(10)], "label": "a", "rank": range(1, 11),
                           "class_rank": range(1, 11), "score": np.linspace(1, 0, 10)}).astype(str)
    scores.loc[row - 1, column] = value
    scores.to_csv(tmp_path / "s.csv", index=False)
    path = str(tmp_path / "s.csv")
    with pytest.raises(ManifestError, match=message):
        read_score_columns(path)
    if column != "id":  # review's second pass parses every block as the first did (ids were checked there)
        with pytest.raises(ManifestError, match=message):
            flagged_rows(path, TableSource(path, "scores"), np.ones(10, dtype=bool))


@pytest.mark.parametrize("weak_hash", [False, True])
@pytest.mark.parametrize("repeat_at, with_index", [(None, False), (9, False), (2, False), (9, True), (5, True)])
def test_a_repeated_score_id_is_found_in_any_block_with_or_without_a_manifest(tmp_path, monkeypatch, repeat_at,
                                                                               with_index, weak_hash):
    """Without a manifest the ids are compared by hash and the rows that share one read again from the file;
    with one, a repeat is a manifest row met twice. A hash shared by different ids is no repeat."""
    import sys

    from irank.formats.scores_table import read_score_columns

    reader_module = sys.modules["irank.formats.scores_table"]  # the scores table's reader
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 3)
    if weak_hash:  # every id collides with every other of its length
        monkeypatch.setattr(reader_module, "text_hashes", lambda values: np.array([len(v) for v in values], np.uint64))
    ids = [f"s{i}" for i in range(10)]
    if repeat_at is not None:
        ids[repeat_at] = ids[repeat_at - 2]
    pd.DataFrame({"id": ids, "label": "a", "rank": range(1, 11), "class_rank": range(1, 11),
                  "score": np.linspace(1, 0, 10)}).to_csv(tmp_path / "s.csv", index=False)
    index = TextColumn.of([f"s{i}" for i in range(10)]) if with_index else None
    if repeat_at is None:
        assert len(read_score_columns(str(tmp_path / "s.csv"), manifest_ids=index)) == 10
        return
    with pytest.raises(ManifestError, match=f"id 's{repeat_at - 2}' appears twice"):
        read_score_columns(str(tmp_path / "s.csv"), manifest_ids=index)


def test_score_columns_and_flagged_rows_hold_what_the_table_holds(tmp_path, monkeypatch):
    from irank.formats.manifest import TableSource
    from irank.formats.scores_table import flagged_rows, read_score_columns

    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 4)
    generator = np.random.default_rng(3)
    scores = pd.DataFrame({"id": [f"x/{i}.png" for i in generator.permutation(11)],
                           "label": generator.choice(["cat", "dog", "é"], 11), "rank": generator.permutation(11) + 1,
                           "class_rank": generator.integers(1, 5, 11), "score": generator.normal(size=11)})
    scores["predicted"] = generator.choice(["cat", "dog", "bird"], 11)
    scores.to_csv(tmp_path / "s.csv", index=False)
    table = pd.read_csv(tmp_path / "s.csv")
    path = str(tmp_path / "s.csv")
    columns = read_score_columns(path)
    assert list(columns.labels) == table["label"].tolist() and columns.manifest_rows is None
    for name in ("rank", "class_rank", "score"):
        assert getattr(columns, name).tolist() == table[name].tolist()
    held = [f"x/{i}.png" for i in range(12)][::-1]  # a manifest's ids, in another order, and one more
    indexed = read_score_columns(path, manifest_ids=TextColumn.of(held))
    assert indexed.manifest_rows.tolist() == [held.index(sample_id) for sample_id in table["id"]]
    assert indexed.unknown == 0 and indexed.rank.tolist() == columns.rank.tolist()
    assert indexed.rank.dtype == np.int32 and indexed.manifest_rows.dtype == np.int32
    fewer = read_score_columns(path, manifest_ids=TextColumn.of(held[2:]))  # x/11 and x/10 are not held
    missing = [sample_id for sample_id in table["id"] if sample_id not in held[2:]]
    assert fewer.unknown == len(missing) and fewer.first_unknown == missing[0]
    assert (fewer.manifest_rows < 0).sum() == len(missing)
    mask = generator.random(11) < 0.5
    flagged, predicted = flagged_rows(path, TableSource(path, "scores"), mask)
    assert flagged["id"].tolist() == table["id"][mask].tolist()
    assert flagged["score"].tolist() == table["score"][mask].tolist() and predicted == set(table["predicted"])


@pytest.mark.parametrize("selection", [{"top": 5}, {"fraction": 0.5, "per_class": True}, {"fraction": 1.0}])
def test_review_read_in_blocks_writes_what_one_block_writes(tmp_path, monkeypatch, selection):
    """review reads the scores twice, a block at a time (the second time from a copy of stdin): the pack is
    the same as when every row is one block."""
    import io
    import sys

    from irank.stages.review import review

    generator = np.random.default_rng(5)
    rows = 23
    labels = generator.choice(["cat", "dog", "é,x"], rows)
    scores = pd.DataFrame({"id": [f"s{i}" for i in range(rows)], "path": [f"img/{i}.png" for i in range(rows)],
                           "label": labels, "predicted": generator.choice(["cat", "dog", "bird"], rows),
                           "label_prob": generator.random(rows), "predicted_prob": generator.random(rows),
                           "score": np.sort(generator.normal(size=rows))[::-1], "rank": np.arange(1, rows + 1),
                           "mine": generator.integers(0, 9, rows)})
    scores["class_rank"] = scores.groupby("label").cumcount() + 1
    scores.to_csv(tmp_path / "scores.csv", index=False)
    whole = review(str(tmp_path / "scores.csv"), output=str(tmp_path / "whole"), **selection)
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 4)
    blocks = review(str(tmp_path / "scores.csv"), output=str(tmp_path / "blocks"), **selection)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((tmp_path / "scores.csv").read_bytes())))
    piped = review("-", output=str(tmp_path / "piped"), image_root_dir=str(tmp_path), **selection)
    assert whole.summary["flagged_rows"] == blocks.summary["flagged_rows"] == piped.summary["flagged_rows"] > 0
    for name in ("index.html", "review.csv", "label-studio.json", "review.json"):
        assert (tmp_path / "blocks" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    for name in ("index.html", "review.csv", "label-studio.json"):
        assert (tmp_path / "piped" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_prune_reads_scores_from_stdin_once_without_a_copy(tmp_path, monkeypatch):
    """prune looks the ids up as it reads them: scores piped in are read once, never kept in a temporary file."""
    import io
    import sys

    from irank.stages.prune import prune

    reader_module = sys.modules["irank.formats.scores_table"]  # the scores table's reader
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 4)
    rows = 13
    write_table(pd.DataFrame({"path": [f"{i}.png" for i in range(rows)], "label": "a"}), tmp_path / "m.csv")
    pd.DataFrame({"id": [f"{i}.png" for i in range(rows)][::-1], "label": "a", "rank": range(1, rows + 1),
                  "class_rank": range(1, rows + 1), "score": np.linspace(1, 0, rows)}).to_csv(tmp_path / "s.csv",
                                                                                            index=False)
    from_file = prune(str(tmp_path / "s.csv"), str(tmp_path / "m.csv"), count=3)

    def no_copy(*args, **kwargs):
        raise AssertionError("the scores were kept in a temporary file")

    monkeypatch.setattr(reader_module, "TableSource", no_copy)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((tmp_path / "s.csv").read_bytes())))
    piped = prune("-", str(tmp_path / "m.csv"), count=3)
    assert piped.keep.tolist() == from_file.keep.tolist() and not piped.keep[-3:].any() and piped.keep[:-3].all()


def ranked_inputs(rows: int, seed: int):
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, 4, rows)
    scores = generator.choice([0.0, 1.0, 2.5, -3.0], rows) + (generator.random(rows) < 0.5) * generator.random(rows)
    logits = torch.from_numpy(generator.normal(size=(rows, 4)))
    return labels, scores, logits


@FAST
@given(st.integers(1, 40), st.integers(1, 9), st.integers(1, 9), st.booleans(), st.booleans())
def test_the_table_sorted_through_temporary_files_is_the_table_sorted_in_memory(rows, block_rows, chunk_rows,
                                                                                 own_columns, on_disk):
    """A Manifest's table, read again in blocks of `chunk_rows` and sorted by rank through a file per
    `block_rows` ranks, with the predictions in memory or in a DiskRows: the same table as in memory."""
    labels, scores, logits = ranked_inputs(rows, rows * 100 + block_rows)
    table = pd.DataFrame({"path": [f"img/{i}.png" for i in range(rows)], "label": [f"c{code}" for code in labels]})
    if own_columns:
        table["note"] = [f"n{i}" for i in range(rows)]
        table["score"] = [str(i) for i in range(rows)]  # a user column irank writes as score_input
    classes = ["c0", "c1", "c2", "c3"]
    with tempfile.TemporaryDirectory() as folder:
        table.to_csv(Path(folder) / "m.csv", index=False)
        manifest = read_manifest(Path(folder) / "m.csv")
        predictions = prediction_rows(logits, torch.from_numpy(labels), MemoryBudget(0 if on_disk else None))
        assert isinstance(predictions, DiskRows) == on_disk
        streamed = RankedScores(manifest, ids=manifest.ids, paths=manifest.paths, labels=labels, classes=classes,
                                predictions=predictions, scores=scores)
        joined = pd.concat(list(streamed.blocks(block_rows, chunk_rows)), ignore_index=True)
    in_memory = RankedScores(table, ids=table["path"].tolist(), paths=table["path"].tolist(), labels=labels,
                             classes=classes, predictions=prediction_columns(logits, torch.from_numpy(labels)),
                             scores=scores).frame()
    assert joined.equals(in_memory)
    assert joined["rank"].tolist() == list(range(1, rows + 1)) and joined["score"].is_monotonic_decreasing
    if own_columns:
        assert (joined["note"].str[1:].astype(int) == joined["path"].str.extract(r"(\d+)")[0].astype(int)).all()
        assert joined["score_input"].tolist() == joined["note"].str[1:].tolist()


@pytest.fixture(scope="module")
def rows_and_model(tmp_path_factory):
    """60 tensor rows with a user column, and an MLP trained on them."""
    import irank

    folder = tmp_path_factory.mktemp("rows")
    train_csv, _ = synthetic.make_embeddings(folder, num_rows=60, dim=4, num_classes=3, noise=0.2, seed=1)
    model = folder / "mlp.safetensors"
    irank.train("mlp-4-8", str(train_csv), output=str(model),
                train_options=irank.TrainOptions(scope="full", epochs=3, lr=0.05, seed=0),
                run_options=irank.RunOptions(device="cpu", batch_size=16))
    return train_csv, model


@pytest.mark.parametrize("boundary", ["head", "refit"])
def test_score_writes_the_same_bytes_in_small_blocks_and_on_disk(cli, rows_and_model, tmp_path, monkeypatch, boundary):
    train_csv, model = rows_and_model
    code, _, err = cli("score", model, train_csv, "-o", tmp_path / "whole.csv", "--boundary", boundary, "-q")
    assert code == 0, err
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 7)
    monkeypatch.setattr(rank_module, "BLOCK_ROWS", 11)
    code, _, err = cli("score", model, train_csv, "-o", tmp_path / "blocks.csv", "--boundary", boundary, "-q",
                       "--memory-budget", "0")
    assert code == 0, err
    whole = (tmp_path / "whole.csv").read_bytes()
    assert (tmp_path / "blocks.csv").read_bytes() == whole
    table = pd.read_csv(tmp_path / "blocks.csv")
    assert len(table) == 60 and {"true_label", "flipped"} <= set(table.columns)


def test_a_manifest_from_stdin_can_be_read_again(monkeypatch):
    """stdin is kept in a temporary file, so its rows can be read again for the output."""
    import io
    import sys

    text = "path,label,note\n" + "".join(f"{i}.png,c{i % 2},n{i}\n" for i in range(7))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 3)
    manifest = read_manifest("-")
    assert list(manifest.paths) == [f"{i}.png" for i in range(7)]
    for _ in range(2):
        assert manifest.table["note"].tolist() == [f"n{i}" for i in range(7)]


def test_a_manifest_that_changes_before_the_output_is_refused(tmp_path):
    table = pd.DataFrame({"path": [f"{i}.png" for i in range(5)], "label": "a", "note": "x"})
    path = tmp_path / "m.csv"
    table.to_csv(path, index=False)
    manifest = read_manifest(path)
    table.iloc[:3].to_csv(path, index=False)
    with pytest.raises(ManifestError, match="changed while irank ran"):
        _ = manifest.table
    pd.concat([table, table.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(ManifestError, match="changed while irank ran"):
        _ = manifest.table


@pytest.mark.parametrize("carriage_in", ["kept", "removed", "none"])
@pytest.mark.parametrize("elsewhere", [False, True])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_prune_streams_the_bytes_of_a_whole_write(tmp_path, monkeypatch, carriage_in, elsewhere, fmt):
    """prune writes the kept rows a block of the manifest at a time, and the removed rows a block of ranks at a
    time sorted through temporary files: each file is the one writing that table whole gives (quoting decided
    on its rows, paths rebased into another folder)."""
    import importlib

    prune_module = importlib.import_module("irank.stages.prune")
    from irank.formats.manifest import rebase_paths, write_table
    from irank.stages.prune import prune

    rows = 11
    ranks = np.random.default_rng(3).permutation(rows) + 1  # rank order is not manifest order
    table = pd.DataFrame({"path": [f"img/{i}.png" for i in range(rows)], "label": [f"c{i % 3}" for i in range(rows)],
                          "note": [f"n,{i}" for i in range(rows)], "score": [f"s{i}" for i in range(rows)]})
    scores = pd.DataFrame({"id": table["path"], "label": table["label"], "rank": ranks,
                           "class_rank": (ranks + 2) // 3, "score": 1 - ranks / rows})
    if carriage_in != "none":
        table.loc[int(np.flatnonzero(ranks == (1 if carriage_in == "removed" else rows))[0]), "note"] = "two\rlines"
    write_table(table, tmp_path / "m.csv")  # every field quoted where a value holds "\r"
    scores.to_csv(tmp_path / "s.csv", index=False)
    folder = tmp_path / ("out" if elsewhere else "")
    folder.mkdir(exist_ok=True)
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 3)
    monkeypatch.setattr(prune_module, "REMOVED_BLOCK_ROWS", 2)
    result = prune(str(tmp_path / "s.csv"), str(tmp_path / "m.csv"), output=str(folder / f"kept.{fmt}"), count=5,
                   removed_output=str(folder / f"removed.{fmt}"))
    write_table(rebase_paths(result.kept, tmp_path, folder / f"whole.{fmt}"), folder / f"whole.{fmt}")
    assert (folder / f"kept.{fmt}").read_bytes() == (folder / f"whole.{fmt}").read_bytes()
    first_line = (folder / f"kept.{fmt}").read_text().splitlines()[0].replace('"', "")
    added_id = first_line.startswith("id,") if fmt == "csv" else first_line.startswith("{id:")
    assert len(result.kept) == rows - 5 and added_id == elsewhere
    # the removed rows, built whole from the inputs: rows ranked 1-5 in rank order, irank's numbers appended
    at = np.argsort(ranks)[:5]
    removed = pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False).iloc[at].reset_index(drop=True)
    removed = removed.assign(rank=ranks[at], class_rank=(ranks[at] + 2) // 3, score_irank=1 - ranks[at] / rows)
    write_table(rebase_paths(removed, tmp_path, folder / f"whole-removed.{fmt}"), folder / f"whole-removed.{fmt}")
    assert (folder / f"removed.{fmt}").read_bytes() == (folder / f"whole-removed.{fmt}").read_bytes()
    assert result.removed["rank"].tolist() == [1, 2, 3, 4, 5]
    assert result.removed.drop(columns=["rank", "class_rank", "score_irank"]).equals(
        pd.read_csv(tmp_path / "m.csv", dtype=str, keep_default_na=False).iloc[at].reset_index(drop=True))


@pytest.mark.parametrize("carriage_in", ["kept", "removed", "relabeled away", "none"])
@pytest.mark.parametrize("elsewhere", [False, True])
def test_apply_streams_the_bytes_of_a_whole_write(tmp_path, monkeypatch, carriage_in, elsewhere):
    from irank.formats.manifest import rebase_paths, write_table
    from irank.stages.apply import apply_review

    rows = 10
    table = pd.DataFrame({"path": [f"img/{i}.png" for i in range(rows)], "label": [f"c{i % 3}" for i in range(rows)],
                          "note": [f"n,{i}" for i in range(rows)]})
    row = {"kept": 7, "removed": 1, "relabeled away": 4, "none": None}[carriage_in]
    if row is not None:
        table.loc[row, "label" if carriage_in == "relabeled away" else "note"] = "a\rb"
    write_table(table, tmp_path / "m.csv")
    decisions = pd.DataFrame({"id": ["img/1.png", "img/4.png", "img/8.png"], "decision": ["remove", "relabel", "keep"],
                              "new_label": ["", "c2", ""]})
    decisions.to_csv(tmp_path / "reviewed.csv", index=False)
    (tmp_path / "classes.txt").write_text("c0\nc1\nc2\n")
    folder = tmp_path / ("out" if elsewhere else "")
    folder.mkdir(exist_ok=True)
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 3)
    result = apply_review(str(tmp_path / "reviewed.csv"), str(tmp_path / "m.csv"), output=str(folder / "fixed.csv"),
                          classes_file=str(tmp_path / "classes.txt"))
    fixed = result.fixed
    write_table(rebase_paths(fixed, tmp_path, folder / "whole.csv"), folder / "whole.csv")
    assert (folder / "fixed.csv").read_bytes() == (folder / "whole.csv").read_bytes()
    assert len(fixed) == rows - 1 and fixed.loc[4, "label"] == "c2" and 1 not in fixed.index
    assert result.audit["new_label"].tolist() == ["", "c2", table.loc[8, "label"]]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 12), st.data(), st.sampled_from([",", "\t"]), st.booleans())
def test_the_plain_csv_writer_writes_what_pandas_writes(rows, data, sep, header):
    """plain_csv (str.join) gives pandas' bytes, or None (pandas then writes the block)."""
    from irank.formats.manifest import plain_csv

    columns = {
        "rank": data.draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=rows, max_size=rows)),
        "score": data.draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=rows, max_size=rows)),
        "flag": data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows)),
        "text": data.draw(st.lists(st.text(max_size=5) | st.sampled_from(["a", "b c", "é", ""]), min_size=rows,
                                   max_size=rows)),
    }
    table = pd.DataFrame(columns)
    table["text"] = table["text"].astype(object)
    text = plain_csv(table, sep, header)
    expected = table.to_csv(index=False, sep=sep, header=header)
    if text is None:  # only when a value needs quoting
        assert any(special in value for value in columns["text"] for special in (sep, '"', "\n", "\r"))
    else:
        assert text == expected


def test_a_subset_reads_back_only_its_rows_in_its_order(tmp_path, monkeypatch):
    """`--on-bad-image skip` keeps a subset of the manifest: its table read again holds those rows only."""
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 2)
    rows = [{"path": f"{i}.png", "label": f"c{i % 2}", "note": f"n{i}"} for i in range(7)]
    rows[3]["note"] = "a\rb"
    write_table(pd.DataFrame(rows), tmp_path / "m.csv")
    manifest = read_manifest(tmp_path / "m.csv")
    assert manifest.carriage_rows.tolist() == [3]
    subset = manifest.subset([6, 0, 3, 5])
    assert list(subset.paths) == ["6.png", "0.png", "3.png", "5.png"] == list(subset.ids)
    assert list(subset.labels) == ["c0", "c0", "c1", "c1"] and subset.carriage_rows.tolist() == [2]
    assert subset.table["note"].tolist() == ["n6", "n0", "a\rb", "n5"]
    assert [len(part) for _, part in subset.chunks()] == [2, 2]
    smaller = subset.subset([1, 3])
    assert smaller.table["note"].tolist() == ["n0", "n5"] and not smaller.carriage_return


def test_the_paths_prune_and_apply_check_for_rebasing_are_the_kept_rows_paths(tmp_path, monkeypatch):
    """`paths_at(keep)` is what path_rebaser looks at: the kept rows' paths in order, read a block at a time;
    of tensor rows' coded files, each file the kept rows use, once."""
    monkeypatch.setattr(manifest_module, "CHUNK_ROWS", 3)
    write_table(pd.DataFrame({"path": [f"{i}.png" for i in range(8)], "label": "c0"}), tmp_path / "images.csv")
    images = read_manifest(tmp_path / "images.csv")
    keep = np.array([True, False, True, True, False, False, True, True])
    assert list(images.paths_at(keep)) == ["0.png", "2.png", "3.png", "6.png", "7.png"]
    for name in ("a", "b", "c"):
        np.save(tmp_path / f"{name}.npy", np.zeros((3, 2), dtype=np.float32))
    write_table(pd.DataFrame({"path": ["a.npy", "b.npy", "a.npy", "c.npy", "b.npy", "a.npy"], "index": [0, 0, 1, 0, 1, 2],
                              "label": "c0"}), tmp_path / "rows.csv")
    rows = read_manifest(tmp_path / "rows.csv")
    assert isinstance(rows.paths, CodedColumn)
    assert list(rows.paths_at(np.array([True, False, True, False, True, True]))) == ["a.npy", "b.npy"]
    assert list(rows.paths_at(np.zeros(6, dtype=bool))) == []


def test_a_manifest_from_a_pipe_can_be_read_again(tmp_path):
    """A named pipe gives its rows once: they are kept in a temporary file for the second read."""
    import os
    import threading

    pipe = tmp_path / "m.csv"
    os.mkfifo(pipe)
    text = "path,label,note\n" + "".join(f"{i}.png,c{i % 2},n{i}\n" for i in range(5))

    def write():
        with open(pipe, "w") as handle:
            handle.write(text)

    writer = threading.Thread(target=write)
    writer.start()
    manifest = read_manifest(pipe)
    writer.join()
    for _ in range(2):
        assert manifest.table["note"].tolist() == [f"n{i}" for i in range(5)]


@FAST
@given(st.lists(st.text(max_size=3), unique=True, max_size=30), st.lists(st.text(max_size=3), max_size=30),
       st.sampled_from(["real", "all collide", "half collide"]), st.integers(1, 7))
def test_ids_are_found_by_hash_as_by_a_dict(held, wanted, hashes, block_rows):
    from irank.formats.columns import TextIndex

    wanted = wanted + held[::2]
    weak = {"real": None,
            "all collide": lambda values: np.zeros(len(values), dtype=np.uint64),
            "half collide": lambda values: text_hashes(values) % np.uint64(2)}[hashes]
    position = {text: row for row, text in enumerate(held)}
    expected = [position.get(text, -1) for text in wanted]
    index = TextIndex(TextColumn.of(held), block_rows, weak)  # the column's hashes made `block_rows` at a time
    assert index.rows_of(wanted).tolist() == expected
    found = [index.rows_of(wanted[start:start + block_rows]).tolist() for start in range(0, len(wanted), block_rows)]
    assert sum(found, []) == expected
