"""Scores → influential ranks and the scores table people and later stages read."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from irank.core.influence import chunk_size, spans
from irank.formats.columns import runs_of, values_at
from irank.formats.manifest import csv_quoting
from irank.formats.tensor_rows import TensorRowIds
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


BLOCK_ROWS = 65_536  # rows of the scores table built (and written) at a time


def rank_order(scores: np.ndarray, ids: list[str], block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Row indices from the highest score to the lowest; ties break by id so the order is deterministic.

    Only the rows that tie are compared by id: an array of every id as fixed-width text would cost
    4 bytes × the longest id × rows. Ties are found a block of ranks at a time, and the order is int32 (where
    the rows fit), descending, filled a block at a time from numpy's int64 ascending argsort, so besides the
    order no array of every row is kept (ten million rows: no 80 MB negated or sorted copy of the scores).
    """
    scores = np.asarray(scores, dtype=np.float64)
    # ties end up in id order below, whatever their order here: no stable sort needed, nor its buffer of n / 2 rows
    ascending = np.argsort(scores)
    order = np.empty(len(scores), dtype=np.int32 if len(scores) < 2**31 else np.int64)
    for start in range(0, len(order), block_rows):  # order[i] = ascending[-1 - i]
        end = min(start + block_rows, len(order))
        order[start:end] = ascending[len(order) - end:len(order) - start][::-1]
    del ascending
    same = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(order) - 1, block_rows):
        ordered = scores[order[start:start + block_rows + 1]]
        same.append(np.flatnonzero(ordered[1:] == ordered[:-1]) + start)
    for start, end in runs_of(np.concatenate(same)):  # runs of equal scores: [start, end) in `order`
        members = order[start:end]
        order[start:end] = members[np.argsort(np.asarray([ids[i] for i in members], dtype=str), kind="stable")]
    return order


def class_ranks_in_order(ordered_labels: np.ndarray, before: np.ndarray | None = None) -> np.ndarray:
    """Given the rows' labels in rank order, each row's rank among the rows of its own class; `before`: the
    number of rows of each class ranked ahead of these (a block of the table: the count so far)."""
    ordered_labels = np.asarray(ordered_labels, dtype=np.int64)
    by_class = np.argsort(ordered_labels, kind="stable")  # within a class, still in rank order
    sorted_labels = ordered_labels[by_class]
    first = np.concatenate([[True], sorted_labels[1:] != sorted_labels[:-1]])
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
    result = np.empty(len(ordered_labels), dtype=np.int64)
    result[by_class] = np.arange(len(first)) - group_start + 1
    if before is not None and len(ordered_labels):
        result += before[ordered_labels]
    return result


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


def scores_table(user_table: pd.DataFrame, **columns) -> pd.DataFrame:
    """One row per sample, sorted by rank, irank's columns first and then the manifest's own (see RankedScores)."""
    return RankedScores(user_table, **columns).frame()
