"""The scores table, `scores.csv`: its one owner. `RankedScores` writes it (score), `read_score_columns` and
`flagged_rows` read it (prune, review, the CI gate).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from irank.core.influence import chunk_size, spans
from irank.core.ranking import BLOCK_ROWS, class_ranks_in_order, rank_order
from irank.formats.columns import (
    CodedColumn,
    CodedColumnBuilder,
    TextIndex,
    first_duplicate,
    int32_if_fits,
    text_hashes,
    values_at,
)
from irank.formats.manifest import TableSource, csv_quoting, iter_table, table_format, table_input
from irank.formats.tensor_rows import TensorRowIds
from irank.runtime.errors import ManifestError
from irank.runtime.memory import DiskRows, MemoryBudget
from irank.runtime.reorder import in_output_order

if TYPE_CHECKING:
    from irank.formats.manifest import Manifest

FIRST_COLUMNS = [
    "rank", "id", "path", "label", "predicted", "label_prob", "predicted_prob", "loss", "score", "class_rank",
    "candidate_2", "candidate_2_prob", "candidate_3", "candidate_3_prob",
]
RUNNER_UPS = (2, 3)  # the model's 2nd and 3rd most probable classes, for annotators


def top_classes(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of `probs` (rows × classes): the given label's probability, the most probable class and its
    probability, and the 2nd and 3rd most probable (index -1 and NaN when there are fewer classes).
    Ties go to the lower class index."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, : max(RUNNER_UPS)]
    rows = np.arange(len(probs))
    columns = {"label_prob": probs[rows, labels], "predicted": order[:, 0], "predicted_prob": probs[rows, order[:, 0]]}
    for place in RUNNER_UPS:
        if probs.shape[1] >= place:
            columns[f"candidate_{place}"] = order[:, place - 1]
            columns[f"candidate_{place}_prob"] = probs[rows, order[:, place - 1]]
        else:
            columns[f"candidate_{place}"] = np.full(len(probs), -1, dtype=np.int64)
            columns[f"candidate_{place}_prob"] = np.full(len(probs), np.nan)
    return columns


PREDICTION_COLUMNS = ("label_prob", "predicted", "predicted_prob", "candidate_2", "candidate_2_prob",
                      "candidate_3", "candidate_3_prob", "loss")
CLASS_COLUMNS = ("predicted", "candidate_2", "candidate_3")  # class indices (exact in float64)


def prediction_rows(logits: torch.Tensor | DiskRows, labels: torch.Tensor,
                    budget: MemoryBudget | None = None) -> torch.Tensor | DiskRows:
    """`top_classes` of softmax(logits) and each row's cross-entropy, in float64, packed as one row of
    PREDICTION_COLUMNS per sample, computed a chunk of rows at a time (with a thousand classes and a million
    rows, all probabilities at once would be 8 GB); held in memory, or past `budget` in a temporary file."""
    rows = (budget or MemoryBudget()).array(len(logits), len(PREDICTION_COLUMNS), torch.float64)
    for start, end in spans(len(logits), chunk_size(logits.shape[1])):
        chunk = logits[start:end].double()
        chunk_labels = labels[start:end]
        part = top_classes(torch.softmax(chunk, dim=1).numpy(), chunk_labels.numpy())
        part["loss"] = F.cross_entropy(chunk, chunk_labels, reduction="none").numpy()
        packed = np.stack([np.asarray(part[name], dtype=np.float64) for name in PREDICTION_COLUMNS], axis=1)
        rows.index_copy_(0, torch.arange(start, end), torch.from_numpy(packed))
    return rows


def unpack_predictions(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Packed prediction rows (rows × PREDICTION_COLUMNS) → one array per column, class indices as int64."""
    return {name: rows[:, place].astype(np.int64) if name in CLASS_COLUMNS else rows[:, place]
            for place, name in enumerate(PREDICTION_COLUMNS)}


def prediction_columns(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """`prediction_rows` as one array per column, in memory."""
    return unpack_predictions(prediction_rows(logits, labels).numpy())


def pack_predictions(columns: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(columns[name], dtype=np.float64) for name in PREDICTION_COLUMNS], axis=1))


def class_names_of(indices: np.ndarray, class_names: np.ndarray) -> np.ndarray:
    """Class names of class indices; "" for -1 (no such class)."""
    names = np.append(np.asarray(class_names, dtype=object), "")
    return names[np.where(indices < 0, len(names) - 1, indices)]


class RankedScores:
    """The scores table, held as its columns in manifest order plus the rank order, and built a block of
    rows at a time: writing a million rows never holds the whole table of strings (ids, paths, class names,
    the manifest's own columns) at once.

    `user_rows`: the manifest's own table, or a `Manifest`, whose table is then read again from its file
    when the table is written. `predictions`: `prediction_rows` of the logits (in memory or a `DiskRows`),
    or `prediction_columns`. A table of more than one block is written through temporary files: the
    manifest's columns and the predictions of each block of manifest rows go to one file per range of ranks,
    then each range is read back, sorted and written in turn.
    """

    def __init__(self, user_rows: "pd.DataFrame | Manifest", *, ids: Sequence[str], paths: Sequence[str],
                 labels: np.ndarray, classes: list[str], predictions: "torch.Tensor | DiskRows | dict[str, np.ndarray]",
                 scores: np.ndarray):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.order = rank_order(self.scores, ids)
        self.labels = np.asarray(labels)
        self._classes_ahead = (0, np.zeros(len(classes), dtype=np.int64))  # (rank, rows of each class ranked above it)
        self.ids, self.paths = ids, paths
        self.predictions = pack_predictions(predictions) if isinstance(predictions, dict) else predictions
        self.class_names = np.asarray(classes, dtype=object)
        self.user_rows = user_rows
        columns = list(user_rows.columns)
        self.extra_columns = tuple(column for column in columns if column not in ("id", "path", "label"))
        self._frame: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.order)

    def rescored(self, scores: np.ndarray) -> "RankedScores":
        """The same rows and predictions, ranked by other `scores` (one a row, in manifest order)."""
        return RankedScores(self.user_rows, ids=self.ids, paths=self.paths, labels=self.labels,
                            classes=list(self.class_names), predictions=self.predictions, scores=scores)

    def _extra(self, chunk: pd.DataFrame) -> pd.DataFrame:
        """The manifest's own columns of a block of its rows (renamed where irank writes a column of that name)."""
        extra = chunk[list(self.extra_columns)]
        return extra.rename(columns={c: f"{c}_input" for c in extra.columns if c in FIRST_COLUMNS})

    def _user_chunks(self, chunk_rows: int | None = None):
        """(row of the block's first row, the block's manifest columns or None when it has none of its own,
        rows in it), in manifest order."""
        if not self.extra_columns:
            step = chunk_rows or BLOCK_ROWS
            for start in range(0, len(self), step):
                yield start, None, min(step, len(self) - start)
        elif isinstance(self.user_rows, pd.DataFrame):
            step = chunk_rows or max(len(self.user_rows), 1)
            for start in range(0, max(len(self.user_rows), 1), step):
                chunk = self._extra(self.user_rows.iloc[start:start + step])
                yield start, chunk, len(chunk)
        else:
            for start, chunk in self.user_rows.chunks(self.extra_columns, chunk_rows=chunk_rows):
                yield start, self._extra(chunk), len(chunk)

    def _whole_extra(self) -> pd.DataFrame:
        if not self.extra_columns:
            return pd.DataFrame(index=pd.RangeIndex(len(self)))
        return pd.concat([chunk for _, chunk, _ in self._user_chunks()], ignore_index=True)

    def _whole_predictions(self) -> np.ndarray:
        return self.predictions[0:len(self)].numpy()

    def block(self, start: int, end: int, extra: pd.DataFrame, predicted: np.ndarray) -> pd.DataFrame:
        """Rows [start, end) of the table in rank order (rank start + 1 first), irank's columns first.
        `extra` and `predicted`: the manifest's own columns and the packed predictions of those rows, in rank order."""
        order = self.order[start:end]
        labels = self.labels[order]
        ordered = unpack_predictions(predicted)
        names = self.class_names
        table = pd.DataFrame(
            {
                "rank": np.arange(start + 1, start + len(order) + 1, dtype=np.int64),
                "id": np.asarray(values_at(self.ids, order), dtype=object),
                "path": np.asarray(values_at(self.paths, order), dtype=object),
                "label": names[labels],
                "predicted": class_names_of(ordered["predicted"], names),
                "label_prob": ordered["label_prob"],
                "predicted_prob": ordered["predicted_prob"],
                "loss": ordered["loss"],
                "score": self.scores[order],
                "class_rank": self._class_ranks(start, labels),
                **{name: class_names_of(ordered[name], names) if not name.endswith("_prob") else ordered[name]
                   for place in RUNNER_UPS for name in (f"candidate_{place}", f"candidate_{place}_prob")},
            }
        )
        return pd.concat([table, extra.reset_index(drop=True)], axis=1)

    def _class_ranks(self, start: int, labels: np.ndarray) -> np.ndarray:
        """Class ranks of the rows ranked start + 1, ... (`labels`: theirs), from the count of each class ranked
        above them: kept from the block before, else counted a block at a time (no array of every row's)."""
        at, ahead = self._classes_ahead
        if at != start:
            ahead = np.zeros_like(ahead)
            for first in range(0, start, BLOCK_ROWS):
                rows = self.order[first:min(first + BLOCK_ROWS, start)]
                ahead += np.bincount(self.labels[rows], minlength=len(ahead))
        ranks = class_ranks_in_order(labels, ahead)
        self._classes_ahead = (start + len(labels), ahead + np.bincount(labels, minlength=len(ahead)))
        return ranks

    def blocks(self, rows: int | None = None, chunk_rows: int | None = None):
        """The table in rank order, `rows` (BLOCK_ROWS) rows at a time (`chunk_rows`: rows of the manifest read
        at a time)."""
        rows = rows or BLOCK_ROWS
        if len(self) > rows:
            yield from self._spilled_blocks(rows, chunk_rows)
        else:  # one block (an empty table still gets its header)
            yield self.frame()

    def _spilled_blocks(self, rows: int, chunk_rows: int | None):
        """Blocks of the table sorted into rank order through temporary files (`reorder.in_output_order`): one
        file per range of `rows` ranks, filled while the manifest is read once, then read one at a time."""
        def pieces():  # each row's rank, its predictions and its manifest columns, a block of the manifest at a time
            rank_of_row = np.empty(len(self), dtype=np.int32 if len(self) < 2**31 else np.int64)
            for start in range(0, len(self), rows):  # a block at a time: no int64 arange of every rank
                rank_of_row[self.order[start:start + rows]] = np.arange(start, min(start + rows, len(self)))
            for start, extra, count in self._user_chunks(chunk_rows):
                yield rank_of_row[start:start + count], (self.predictions[start:start + count].numpy(), extra)

        for number, (predicted, extra) in enumerate(in_output_order(pieces(), len(self), rows)):
            start = number * rows
            end = min(start + rows, len(self))
            yield self.block(start, end, pd.DataFrame(index=pd.RangeIndex(end - start)) if extra is None else extra,
                             predicted)

    def csv_quoting(self) -> int:
        """`manifest.csv_quoting` of the whole table, from its string columns (a number holds no carriage return)."""
        if any("\r" in name for name in self.class_names.tolist()):
            return csv.QUOTE_ALL
        if isinstance(self.user_rows, pd.DataFrame):
            # made tensor-row ids hold only their path, key (a manifest column) and index: nothing to look at twice
            ids = [] if isinstance(self.ids, TensorRowIds) else self.ids
            return csv_quoting(self._whole_extra(), ids, self.paths)
        return csv.QUOTE_ALL if self.user_rows.carriage_return else csv.QUOTE_MINIMAL

    def verdict_columns(self) -> pd.DataFrame:
        """label, predicted and score of every row (manifest order): what a CI gate reads, without the rest."""
        column = PREDICTION_COLUMNS.index("predicted")
        predicted = np.concatenate([self.predictions[start:end][:, column].numpy().astype(np.int64)
                                    for start, end in spans(len(self), BLOCK_ROWS)] or [np.zeros(0, dtype=np.int64)])
        return pd.DataFrame({"label": self.class_names[self.labels],
                             "predicted": class_names_of(predicted, self.class_names),
                             "score": self.scores})

    def frame(self) -> pd.DataFrame:
        """The whole table (built once, on first use)."""
        if self._frame is None:
            self._frame = self.block(0, len(self), self._whole_extra().take(self.order),
                                     self._whole_predictions()[self.order])
        return self._frame


SCORE_COLUMNS = ("id", "label", "rank", "class_rank", "score")


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


def flagged_rows(path: str, source: TableSource, mask: np.ndarray,
                 each_block: Callable[[pd.DataFrame], None] | None = None) -> tuple[pd.DataFrame, set[str]]:
    """The rows of a scores table where `mask` is true, every column, in the file's order (`review` shows them
    all), read a block at a time so that only they are kept; and every name in its `predicted` column.
    `each_block` is handed every block as it is read (review sums what the whole table says from them)."""
    parts, predicted = [], set()
    start = 0
    for chunk in _score_blocks(path, None, source):
        if start + len(chunk) > len(mask):
            raise ManifestError(f"scores {path}: changed while irank read it (more than {len(mask)} rows now)")
        if each_block is not None:
            each_block(chunk)
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
