"""`irank prune`: a scores table + the manifest → the kept manifest and the removed rows. No model needed."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ._version import __version__
from .columns import CodedColumn, CodedColumnBuilder, TextIndex, first_duplicate, int32_if_fits, text_hashes
from .errors import ManifestError, UsageError
from .files import check_outputs_clear_of_inputs, check_overwrite, is_stdio, output_set, sha256_file, write_json_atomic
from .manifest import (Manifest, TableSource, blocks_quoting, iter_table, path_rebaser, read_manifest, table_input,
                       table_format, write_blocks)
from .reorder import in_output_order

SCORE_COLUMNS = ("id", "label", "rank", "class_rank", "score")


def validate_rule(*, fraction: float | None, count: int | None, min_score: float | None, min_per_class: int) -> None:
    """Refuse a pruning rule that cannot work, before any file is read."""
    chosen = [name for name, value in (("--fraction", fraction), ("--count", count), ("--min-score", min_score)) if value is not None]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --fraction, --count or --min-score" + (f" (got {', '.join(chosen)})" if chosen else ""))
    if fraction is not None and not 0 < fraction < 1:
        raise UsageError(f"--fraction {fraction}: must be between 0 and 1 (exclusive)")
    if count is not None and count < 0:
        raise UsageError(f"--count {count}: must be 0 or more")
    if min_per_class < 0:
        raise UsageError(f"--min-per-class {min_per_class}: must be 0 or more")


def removal_mask(
    scores: np.ndarray,
    ranks: np.ndarray,
    class_ranks: np.ndarray,
    labels: np.ndarray,
    *,
    fraction: float | None = None,
    count: int | None = None,
    min_score: float | None = None,
    per_class: bool = False,
    min_per_class: int = 1,
) -> np.ndarray:
    """Which rows to remove. Exactly one of fraction / count / min_score; per class by class_rank if asked.

    With per_class, `fraction` is taken from each class and `count` means that many from each class.
    Afterwards every class keeps at least min(min_per_class, its size) rows: the least influential of
    the rows chosen for removal are put back first.
    """
    validate_rule(fraction=fraction, count=count, min_score=min_score, min_per_class=min_per_class)
    labels = np.asarray(labels)
    if min_score is not None:
        remove = scores >= min_score
    elif not per_class:
        size = count if count is not None else int(round(fraction * len(scores)))
        remove = ranks <= size
    else:
        remove = np.zeros(len(scores), dtype=bool)
        for label in np.unique(labels):
            members = labels == label
            size = count if count is not None else int(round(fraction * members.sum()))
            remove |= members & (class_ranks <= size)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        floor = min(min_per_class, len(members))
        shortfall = floor - int((~remove[members]).sum())
        if shortfall > 0:
            removed_members = members[remove[members]]
            put_back = removed_members[np.argsort(-class_ranks[removed_members], kind="stable")[:shortfall]]
            remove[put_back] = False
    return remove


def _score_block(chunk: pd.DataFrame, path: str, start: int) -> pd.DataFrame:
    """A block of a scores table with its ids and labels as text and its numbers parsed (a clear error
    naming the row where one is not a number)."""
    if start == 0:
        missing = [column for column in SCORE_COLUMNS if column not in chunk.columns]
        if missing:
            raise ManifestError(f"scores {path}: missing column {', '.join(missing)}; is this the output of irank score?")
    chunk = chunk.copy()
    chunk["id"] = chunk["id"].astype(str)
    chunk["label"] = chunk["label"].astype(str)
    for column in ("rank", "class_rank", "score"):
        converted = pd.to_numeric(chunk[column], errors="coerce")
        bad = np.flatnonzero(converted.isna().to_numpy())
        if len(bad):
            raise ManifestError(f"scores {path}: row {start + bad[0] + 1}: {column} {chunk[column].iloc[bad[0]]!r} "
                                "is not a number")
        chunk[column] = converted
    return chunk


def _score_blocks(path: str, columns: tuple[str, ...] | None,
                  source: TableSource | None = None) -> Iterator[pd.DataFrame]:
    """The scores table's blocks, each checked and converted by `_score_block` (row numbers the table's);
    read from `source` when given (a table read twice: stdin is kept in a temporary file)."""
    start = 0
    chunks = source.chunks(columns) if source is not None else \
        iter_table(table_input(path, "scores"), table_format(path), what="scores", name=str(path), columns=columns)
    for chunk in chunks:
        yield _score_block(chunk, path, start)
        start += len(chunk)


def flagged_rows(path: str, source: TableSource, mask: np.ndarray) -> tuple[pd.DataFrame, set[str]]:
    """The rows of a scores table where `mask` is true, every column, in the file's order (`review` shows them
    all), read a block at a time so that only they are kept; and every name in its `predicted` column."""
    parts, predicted = [], set()
    start = 0
    for chunk in _score_blocks(path, None, source):
        if start + len(chunk) > len(mask):
            raise ManifestError(f"scores {path}: changed while irank read it (more than {len(mask)} rows now)")
        if "predicted" in chunk.columns:
            predicted.update(chunk["predicted"].astype(str).unique().tolist())
        parts.append(chunk[mask[start:start + len(chunk)]])
        start += len(chunk)
    if start != len(mask):
        raise ManifestError(f"scores {path}: changed while irank read it ({start} rows now, {len(mask)} before)")
    return pd.concat(parts, ignore_index=True), predicted


@dataclass
class ScoreColumns:
    """The columns of a scores table that `prune` and `review` read, held compactly: labels as codes, the
    numbers as arrays (rank and class rank int32 where they fit). The ids are checked for repeats as they are
    read and not kept; given a manifest's `TextIndex`, each row's manifest row is kept instead."""

    labels: CodedColumn
    rank: np.ndarray
    class_rank: np.ndarray
    score: np.ndarray
    manifest_rows: np.ndarray | None = None  # with an index: each row's manifest row (int32 where it fits), -1: none
    unknown: int = 0  # with an index: rows whose id the manifest does not hold
    first_unknown: str | None = None  # the first of those ids

    def __len__(self) -> int:
        return len(self.rank)


class ScoreIds:
    """The ids of given rows of a scores table, read again from its file (`first_duplicate` asks for the few
    rows whose ids share a hash): the table's ids are never all held."""

    def __init__(self, path: str, source: TableSource):
        self.path, self.source = path, source
        self.read: dict[int, str] = {}  # every id read so far, by row

    def values_at(self, rows: np.ndarray) -> list[str]:
        wanted = np.asarray(rows, dtype=np.int64)
        order = np.argsort(wanted, kind="stable")
        texts: list[str | None] = [None] * len(wanted)
        start = 0
        for chunk in self.source.chunks(("id",)):
            low, high = np.searchsorted(wanted[order], [start, start + len(chunk)])
            block_ids = chunk["id"].astype(str).to_numpy()
            for place in order[low:high].tolist():
                texts[place] = block_ids[wanted[place] - start]
            start += len(chunk)
        if any(text is None for text in texts):
            raise ManifestError(f"scores {self.path}: changed while irank read it ({start} rows now)")
        self.read.update(zip(wanted.tolist(), texts))
        return texts


def read_score_columns(path: str, source: TableSource | None = None,
                       manifest_ids: Sequence[str] | None = None) -> ScoreColumns:
    """`prune`'s and `review`'s columns of a scores table, a block of rows at a time (from `source` when given,
    else from `path`: read once with `manifest_ids`, else stdin kept in a temporary file), each block checked
    by `_score_block`; then the ids for repeats. With `manifest_ids` each id's manifest row is looked up as it
    is read, in a `TextIndex` of them (dropped before the columns are joined), and a repeat is a manifest row
    met twice; without, ids are compared by hash, and the ids that share one read again."""
    index = None if manifest_ids is None else TextIndex(manifest_ids)
    if source is None and index is None:  # the ids may be read again: stdin is kept in a temporary file
        source = TableSource(path, "scores")
    labels = CodedColumnBuilder()
    numbers: dict[str, list[np.ndarray]] = {"rank": [], "class_rank": [], "score": [], "manifest_rows": []}
    hashes = []
    seen = None if index is None else np.zeros(len(index), dtype=bool)
    repeated: str | None = None
    unknown, first_unknown = 0, None
    for chunk in _score_blocks(path, SCORE_COLUMNS, source):
        block_ids = chunk["id"].tolist()
        if index is None:
            hashes.append(text_hashes(block_ids))
        else:
            rows = index.rows_of(block_ids)
            missing = np.flatnonzero(rows < 0)
            if len(missing) and first_unknown is None:
                first_unknown = block_ids[int(missing[0])]
            unknown += len(missing)
            known = np.flatnonzero(rows >= 0)
            if repeated is None:
                # a manifest row met before, or twice in this block: its id repeats (the manifest's ids are distinct)
                again = seen[rows[known]]
                _, first_places = np.unique(rows[known], return_index=True)
                again[np.setdiff1d(np.arange(len(known)), first_places)] = True
                if again.any():
                    repeated = block_ids[int(known[np.argmax(again)])]
            seen[rows[known]] = True
            numbers["manifest_rows"].append(int32_if_fits(rows))
        labels.add(chunk["label"].tolist())
        numbers["rank"].append(int32_if_fits(chunk["rank"].to_numpy(np.int64)))
        numbers["class_rank"].append(int32_if_fits(chunk["class_rank"].to_numpy(np.int64)))
        numbers["score"].append(chunk["score"].to_numpy(np.float64))
    has_index = index is not None
    del index  # 12 bytes a row, not needed to join the columns below
    if not has_index:
        hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        ids = ScoreIds(path, source)
        pair = first_duplicate(ids, hashes)
        del hashes
        repeated = None if pair is None else ids.read[pair[1]]
    if repeated is not None:
        raise ManifestError(f"scores {path}: id {repeated!r} appears twice")

    def joined(name: str, dtype) -> np.ndarray:
        parts, numbers[name] = numbers[name], []
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    return ScoreColumns(labels.build(), joined("rank", np.int32), joined("class_rank", np.int32),
                        joined("score", np.float64),
                        manifest_rows=joined("manifest_rows", np.int32) if has_index else None,
                        unknown=unknown, first_unknown=first_unknown)


REMOVED_BLOCK_ROWS = 65_536  # removed rows put into rank order (through temporary files) and written at a time


class PruneResult:
    """What `prune` decided. `kept` (the manifest's table without the removed rows, in its order) and `removed`
    (the removed rows in rank order, with their rank, class_rank and score) are read from the manifest's file
    when asked: `prune` itself writes them a block of rows at a time."""

    def __init__(self, samples: Manifest, keep: np.ndarray, removed_rows: np.ndarray,
                 removed_numbers: dict[str, np.ndarray], summary: dict):
        self.samples, self.keep, self.summary = samples, keep, summary
        self.removed_rows = removed_rows  # the removed rows' manifest rows, in rank order
        self.removed_numbers = removed_numbers  # their rank, class_rank and score, in the same order

    @property
    def kept(self) -> pd.DataFrame:
        return self.samples.table[self.keep]

    @property
    def removed(self) -> pd.DataFrame:
        return pd.concat(list(self.removed_blocks()), ignore_index=True)

    def kept_blocks(self, rebase=None):
        """The kept rows a block of the manifest at a time (the first block carries the header even when empty)."""
        for start, chunk in self.samples.chunks():
            block = chunk[self.keep[start:start + len(chunk)]]
            yield block if rebase is None else rebase(block)

    def removed_blocks(self, rebase=None):
        """The removed rows in rank order, their rank, class_rank and score appended (as rank_irank, ... where
        the manifest has such a column), REMOVED_BLOCK_ROWS at a time, the manifest read once (the first
        block carries the header even when no row is removed)."""
        by_row = np.argsort(self.removed_rows, kind="stable")
        rows = self.removed_rows[by_row]
        header = []

        def pieces():  # (each removed row's place in rank order, its manifest columns), a block of the manifest at a time
            for start, chunk in self.samples.chunks():
                if not header:
                    header.append(chunk.iloc[:0])
                low, high = np.searchsorted(rows, [start, start + len(chunk)])
                yield by_row[low:high], (chunk.iloc[rows[low:high] - start],)

        first = 0
        for (block,) in in_output_order(pieces(), len(rows), REMOVED_BLOCK_ROWS):
            yield self._numbered(block, first, rebase)
            first += len(block)
        if first == 0:
            yield self._numbered(header[0] if header else pd.DataFrame(), 0, rebase)

    def _numbered(self, block: pd.DataFrame, first: int, rebase) -> pd.DataFrame:
        block = block.reset_index(drop=True)
        for column in ("rank", "class_rank", "score"):
            name = column if column not in block.columns else f"{column}_irank"
            block[name] = self.removed_numbers[column][first:first + len(block)]
        return block if rebase is None else rebase(block)


def _piped_scores(scores: str) -> TableSource | None:
    """A named pipe given by path gives its rows once: read through a copy, which can then be hashed (stdin is read
    once, as it comes, and not hashed)."""
    if is_stdio(scores) or not os.path.exists(scores) or stat.S_ISREG(os.stat(scores).st_mode):
        return None
    return TableSource(scores, "scores")


def prune(
    scores: str,
    manifest: str,
    *,
    output: str | None = None,
    removed_output: str | None = None,
    fraction: float | None = None,
    count: int | None = None,
    min_score: float | None = None,
    per_class: bool = False,
    min_per_class: int = 1,
    overwrite: bool = False,
) -> PruneResult:
    """Remove the rows ranked first in `scores` from `manifest` (see `removal_mask`).

    The kept manifest has the input's rows, columns and order minus the removed rows; the removed
    rows come sorted by rank, with their rank, class_rank and score appended.
    """
    validate_rule(fraction=fraction, count=count, min_score=min_score, min_per_class=min_per_class)
    if output is not None:
        table_format(output)
    if removed_output is not None:
        table_format(removed_output)
    outputs = {"-o": output, "--removed": removed_output,
               "the sidecar": output + ".json" if output and not is_stdio(output) else None}
    check_outputs_clear_of_inputs(outputs, {"scores": scores, "manifest": manifest})
    check_overwrite(outputs, overwrite)
    if is_stdio(output) and is_stdio(removed_output):
        raise UsageError("-o and --removed cannot both go to stdout")
    samples = read_manifest(manifest, require_label=False)
    # each scored id's manifest row, by hash, looked up as the scores are read: neither the manifest's ids
    # nor the table's are held as strings
    source = _piped_scores(scores)
    score_table = read_score_columns(scores, source=source, manifest_ids=samples.ids)
    scores_sha256 = None if is_stdio(scores) else source.sha256() if source else sha256_file(scores)
    if score_table.unknown:
        raise ManifestError(f"scores {scores}: id {score_table.first_unknown!r} is not in manifest {manifest} "
                            f"({score_table.unknown} such ids)")
    manifest_row = score_table.manifest_rows
    remove = removal_mask(score_table.score, score_table.rank, score_table.class_rank, score_table.labels.codes,
                          fraction=fraction, count=count, min_score=min_score, per_class=per_class,
                          min_per_class=min_per_class)
    removed_at = np.flatnonzero(remove)  # positions in the scores table, then by rank (stable, as sort_values)
    removed_at = removed_at[np.argsort(score_table.rank[removed_at], kind="mergesort")]
    removed_rows = manifest_row[removed_at]
    keep = np.ones(len(samples), dtype=bool)
    keep[removed_rows] = False
    removed_codes = np.bincount(score_table.labels.codes[removed_at], minlength=len(score_table.labels.values))
    per_class_removed = sorted((label, int(number)) for label, number in zip(score_table.labels.values, removed_codes)
                               if number)
    summary = {
        "irank_version": __version__,
        "command": "prune",
        "parameters": {
            "fraction": fraction, "count": count, "min_score": min_score,
            "per_class": per_class, "min_per_class": min_per_class,
        },
        "input_rows": len(samples),
        "scored_rows": len(score_table),
        "unscored_rows_kept": len(samples) - len(score_table),
        "kept_rows": int(keep.sum()),
        "removed_rows": int((~keep).sum()),
        "removed_per_class": dict(per_class_removed),
        "inputs": {
            "scores": {"path": scores, "sha256": scores_sha256},
            "manifest": {"path": manifest, "sha256": samples.table_source.sha256()},  # a pipe: its copy's
        },
    }
    result = PruneResult(samples, keep, removed_rows,
                         {column: getattr(score_table, column)[removed_at] for column in ("rank", "class_rank", "score")},
                         summary)
    with output_set(overwrite):  # the kept manifest, its sidecar and the removed rows change together
        if output is not None:
            rebase = path_rebaser(samples.paths_at(keep), samples.root, output)
            write_blocks(result.kept_blocks(rebase), output, quoting=blocks_quoting(result.kept_blocks, samples, keep))
            if not is_stdio(output):
                write_json_atomic(output + ".json", summary)
        if removed_output is not None:
            rebase = path_rebaser(samples.paths_at(~keep), samples.root, removed_output)
            write_blocks(result.removed_blocks(rebase), removed_output,
                         quoting=blocks_quoting(result.removed_blocks, samples, ~keep))
    return result
