"""Property tests (hypothesis): the prune rule and the manifest reader/writer, for any input they may meet."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irank.core.ranking import class_ranks_in_order, rank_order
from irank.formats.manifest import csv_quoting, read_manifest, read_table, write_blocks, write_table
from irank.formats.scores_table import RankedScores, prediction_columns
from irank.runtime.errors import ManifestError
from irank.stages.prune import prune

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def scored_manifests(draw):
    """A manifest (with a user column) and its scores table, as irank score would write them."""
    rows = draw(st.integers(1, 40))
    classes = draw(st.integers(1, 5))
    labels = draw(st.lists(st.integers(0, classes - 1), min_size=rows, max_size=rows))
    scores = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=rows, max_size=rows))
    manifest = pd.DataFrame({"path": [f"img/{i}.png" for i in range(rows)], "label": [f"c{code}" for code in labels],
                             "note": [f"n{i}" for i in range(rows)]})
    names = [f"c{i}" for i in range(classes)]
    predictions = prediction_columns(torch.zeros(rows, classes), torch.tensor(labels))
    table = RankedScores(manifest, ids=manifest["path"].tolist(), paths=manifest["path"].tolist(),
                         labels=np.array(labels), classes=names, predictions=predictions, scores=np.array(scores)).frame()
    return manifest, table


rules = st.one_of(
    st.builds(lambda f: {"fraction": f}, st.floats(0.01, 0.99)),
    st.builds(lambda c: {"count": c}, st.integers(0, 50)),
    st.builds(lambda s: {"min_score": s}, st.floats(-1e6, 1e6)),
)


@FAST
@given(scored_manifests(), rules, st.booleans(), st.integers(0, 4))
def test_prune_partitions_the_manifest(case, rule, per_class, min_per_class):
    manifest, table = case
    if per_class and "min_score" in rule:
        per_class = False
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        manifest.to_csv(folder / "m.csv", index=False)
        table.to_csv(folder / "s.csv", index=False)
        result = prune(str(folder / "s.csv"), str(folder / "m.csv"), per_class=per_class, min_per_class=min_per_class, **rule)
        kept, removed = result.kept, result.removed  # kept is read from the manifest's file
    kept_ids, removed_ids = set(kept["path"]), set(removed["path"])
    assert kept_ids | removed_ids == set(manifest["path"])  # kept ∪ removed = input
    assert not kept_ids & removed_ids  # kept ∩ removed = ∅
    assert list(kept.columns) == list(manifest.columns)  # columns preserved
    assert kept["path"].tolist() == [p for p in manifest["path"] if p in kept_ids]  # order preserved
    assert removed["rank"].is_monotonic_increasing
    for label, size in manifest["label"].value_counts().items():
        assert (kept["label"] == label).sum() >= min(min_per_class, size)  # --min-per-class holds


text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(lambda t: t.strip() == t)


@st.composite
def manifests(draw):
    rows = draw(st.integers(1, 8))
    paths = draw(st.lists(text, min_size=rows, max_size=rows, unique=True))
    labels = draw(st.lists(text, min_size=rows, max_size=rows))
    extra = draw(st.lists(st.text(max_size=10), min_size=rows, max_size=rows))
    return pd.DataFrame({"path": paths, "label": labels, "user column": extra})


@FAST
@given(manifests(), st.sampled_from(["csv", "tsv", "jsonl"]))
def test_manifest_read_write_read_is_the_identity(table, fmt):
    with tempfile.TemporaryDirectory() as folder:
        first = Path(folder) / f"a.{fmt}"
        write_table(table, first)
        once = read_manifest(first)
        second = Path(folder) / f"b.{fmt}"
        write_table(once.table, second)
        twice = read_manifest(second)
        assert twice.table.equals(once.table)  # the table is read again from its file: while it exists
    assert once.paths == table["path"].tolist() and once.labels == table["label"].tolist()
    assert (twice.paths, twice.labels, twice.ids) == (once.paths, once.labels, once.ids)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["csv", "tsv", "jsonl"]))
def test_fuzz_the_manifest_reader(data, fmt):
    """Any bytes: read, or refused with ManifestError (one line) — never another exception."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"m.{fmt}"
        path.write_bytes(data)
        try:
            read_manifest(path)
        except ManifestError as error:
            assert "\n" not in str(error)
        try:
            read_table(path)
        except ManifestError:
            pass


@FAST
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2)), min_size=1, max_size=60), st.randoms(),
       st.integers(1, 8), st.data())
def test_rank_order_breaks_ties_by_id_and_class_ranks_follow_it(rows, random, block_rows, data):
    """Against the plain definition: sort by (score descending, id); a row's class rank is its place
    among its class's rows in that order. Ties are looked for `block_rows` ranks at a time (runs of ties
    cross the blocks' edges), and class ranks a block of the table at a time."""
    scores = np.array([float(score) for score, _ in rows])  # few distinct values: many ties
    labels = np.array([label for _, label in rows])
    ids = [f"id-{i}" for i in range(len(rows))]
    random.shuffle(ids)
    order = rank_order(scores, ids, block_rows=block_rows)
    assert order.tolist() == np.lexsort((np.asarray(ids, dtype=str), -scores)).tolist()
    expected = [sum(1 for j in order[: place + 1] if labels[j] == labels[order[place]]) for place in range(len(order))]
    assert class_ranks_in_order(labels[order]).tolist() == expected
    split = data.draw(st.integers(0, len(rows)))
    ahead = np.bincount(labels[order[:split]], minlength=3)
    assert class_ranks_in_order(labels[order[split:]], ahead).tolist() == expected[split:]


@FAST
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2)), min_size=1, max_size=40), st.data())
def test_a_block_of_the_table_asked_for_out_of_turn_has_the_class_ranks_of_the_whole(rows, data):
    """RankedScores counts the classes ranked above a block from the blocks before it; a block asked for out
    of turn (or twice) counts them afresh."""
    scores = np.array([float(score) for score, _ in rows])
    labels = np.array([label for _, label in rows])
    paths = [f"img/{i}.png" for i in range(len(rows))]
    table = pd.DataFrame({"path": paths, "label": [f"c{label}" for label in labels]})
    logits = torch.from_numpy(np.random.default_rng(len(rows)).normal(size=(len(rows), 3)))
    ranked = RankedScores(table, ids=paths, paths=paths, labels=labels, classes=["c0", "c1", "c2"],
                          predictions=prediction_columns(logits, torch.from_numpy(labels)), scores=scores)
    whole = ranked.frame()
    predicted = ranked.predictions.numpy()[ranked.order]
    for _ in range(3):
        start = data.draw(st.integers(0, len(rows) - 1))
        end = data.draw(st.integers(start + 1, len(rows)))
        block = ranked.block(start, end, pd.DataFrame(index=pd.RangeIndex(end - start)), predicted[start:end])
        assert block["class_rank"].tolist() == whole["class_rank"].tolist()[start:end]


@FAST
@given(manifests(), st.sampled_from(["csv", "tsv", "jsonl"]), st.integers(1, 7))
def test_writing_in_blocks_gives_the_bytes_of_writing_whole(table, fmt, block_rows):
    """score writes its table a block of rows at a time: the file must be the one a whole write gives."""
    blocks = [table.iloc[start:start + block_rows] for start in range(0, max(len(table), 1), block_rows)]
    with tempfile.TemporaryDirectory() as folder:
        whole, in_blocks = Path(folder) / f"whole.{fmt}", Path(folder) / f"blocks.{fmt}"
        write_table(table, whole)
        write_blocks(blocks, in_blocks, quoting=csv_quoting(table))
        assert in_blocks.read_bytes() == whole.read_bytes()


@FAST
@given(st.integers(1, 40), st.integers(1, 9), st.data())
def test_the_ranked_blocks_make_up_the_whole_table(rows, block_rows, data):
    labels = np.array(data.draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows)))
    scores = np.array(data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.5, -3.0]) | st.floats(-10, 10),
                                         min_size=rows, max_size=rows)))
    manifest = pd.DataFrame({"path": [f"img/{i}.png" for i in range(rows)], "label": [f"c{code}" for code in labels],
                             "note": [f"n{i}" for i in range(rows)]})
    predictions = prediction_columns(torch.randn(rows, 4, generator=torch.Generator().manual_seed(rows)),
                                     torch.from_numpy(labels))
    ranked = RankedScores(manifest, ids=manifest["path"].tolist(), paths=manifest["path"].tolist(), labels=labels,
                          classes=["c0", "c1", "c2", "c3"], predictions=predictions, scores=scores)
    joined = pd.concat(list(ranked.blocks(block_rows)), ignore_index=True)
    assert joined.equals(ranked.frame())
    assert joined["rank"].tolist() == list(range(1, rows + 1))
    assert joined["score"].is_monotonic_decreasing
    assert sorted(joined["note"]) == sorted(manifest["note"])
