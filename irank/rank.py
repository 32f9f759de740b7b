"""Scores → influential ranks and the scores table people and later stages read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .influence import chunk_size, spans
from .manifest import csv_quoting
from .tensors import TensorRowIds

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


def prediction_columns(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """`top_classes` of softmax(logits) and each row's cross-entropy, in float64, a chunk of rows at a time:
    with a thousand classes and a million rows, all probabilities at once would be 8 GB."""
    columns: dict[str, list[np.ndarray]] = {}
    for start, end in spans(len(logits), chunk_size(logits.shape[1])):
        chunk = logits[start:end].double()
        chunk_labels = labels[start:end]
        part = top_classes(torch.softmax(chunk, dim=1).numpy(), chunk_labels.numpy())
        part["loss"] = F.cross_entropy(chunk, chunk_labels, reduction="none").numpy()
        for name, values in part.items():
            columns.setdefault(name, []).append(values)
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def class_names_of(indices: np.ndarray, class_names: np.ndarray) -> np.ndarray:
    """Class names of class indices; "" for -1 (no such class)."""
    names = np.append(np.asarray(class_names, dtype=object), "")
    return names[np.where(indices < 0, len(names) - 1, indices)]


def rank_order(scores: np.ndarray, ids: list[str]) -> np.ndarray:
    """Row indices from most to least influential; ties break by id so the order is deterministic.

    Only the rows that tie are compared by id: an array of every id as fixed-width text would cost
    4 bytes × the longest id × rows.
    """
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(same) == 0:
        return order
    # runs of equal scores: [start, end) in `order`
    breaks = np.flatnonzero(np.diff(same) != 1)
    starts = np.concatenate([same[:1], same[breaks + 1]])
    ends = np.concatenate([same[breaks], same[-1:]]) + 2
    for start, end in zip(starts.tolist(), ends.tolist()):
        members = order[start:end]
        order[start:end] = members[np.argsort(np.asarray([ids[i] for i in members], dtype=str), kind="stable")]
    return order


def class_ranks_in_order(ordered_labels: np.ndarray) -> np.ndarray:
    """Given the rows' labels in rank order, each row's rank among the rows of its own class."""
    by_class = np.argsort(ordered_labels, kind="stable")  # within a class, still in rank order
    sorted_labels = ordered_labels[by_class]
    first = np.concatenate([[True], sorted_labels[1:] != sorted_labels[:-1]])
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
    result = np.empty(len(ordered_labels), dtype=np.int64)
    result[by_class] = np.arange(len(first)) - group_start + 1
    return result


BLOCK_ROWS = 65_536  # rows of the scores table built (and written) at a time


class RankedScores:
    """The scores table, held as its columns in manifest order plus the rank order, and built a block of
    rows at a time: writing a million rows never holds the whole table of strings (ids, paths, class names,
    the manifest's own columns) at once.

    `predictions`: `prediction_columns` of the model's logits.
    """

    def __init__(self, user_table: pd.DataFrame, *, ids: list[str], paths: list[str], labels: np.ndarray,
                 classes: list[str], predictions: dict[str, np.ndarray], scores: np.ndarray):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.order = rank_order(self.scores, ids)
        self.labels = np.asarray(labels)
        self.class_ranks = class_ranks_in_order(self.labels[self.order])
        self.ids, self.paths, self.predictions = ids, paths, predictions
        self.class_names = np.asarray(classes, dtype=object)
        extra = user_table.drop(columns=[c for c in ("id", "path", "label") if c in user_table.columns])
        self.extra = extra.rename(columns={c: f"{c}_input" for c in extra.columns if c in FIRST_COLUMNS})
        self._frame: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.order)

    def block(self, start: int, end: int) -> pd.DataFrame:
        """Rows [start, end) of the table in rank order (rank start + 1 first), irank's columns first."""
        order = self.order[start:end]
        labels = self.labels[order]
        ordered = {name: values[order] for name, values in self.predictions.items()}
        names = self.class_names
        table = pd.DataFrame(
            {
                "rank": np.arange(start + 1, start + len(order) + 1, dtype=np.int64),
                "id": np.asarray([self.ids[i] for i in order.tolist()], dtype=object),
                "path": np.asarray([self.paths[i] for i in order.tolist()], dtype=object),
                "label": names[labels],
                "predicted": class_names_of(ordered["predicted"], names),
                "label_prob": ordered["label_prob"],
                "predicted_prob": ordered["predicted_prob"],
                "loss": ordered["loss"],
                "score": self.scores[order],
                "class_rank": self.class_ranks[start:end],
                **{name: class_names_of(ordered[name], names) if not name.endswith("_prob") else ordered[name]
                   for place in RUNNER_UPS for name in (f"candidate_{place}", f"candidate_{place}_prob")},
            }
        )
        return pd.concat([table, self.extra.take(order).reset_index(drop=True)], axis=1)

    def blocks(self, rows: int = BLOCK_ROWS):
        """The table in rank order, `rows` rows at a time."""
        for start in range(0, max(len(self), 1), rows):  # an empty table still gets its header
            yield self.block(start, min(start + rows, len(self)))

    def csv_quoting(self) -> int:
        """`manifest.csv_quoting` of the whole table, from its string columns (a number holds no carriage return)."""
        # made tensor-row ids hold only their path, key (a manifest column) and index: nothing to look at twice
        ids = [] if isinstance(self.ids, TensorRowIds) else self.ids
        return csv_quoting(self.extra, ids, self.paths, self.class_names.tolist())

    def verdict_columns(self) -> pd.DataFrame:
        """label, predicted and score of every row (manifest order): what a CI gate reads, without the rest."""
        return pd.DataFrame({"label": self.class_names[self.labels],
                             "predicted": class_names_of(self.predictions["predicted"], self.class_names),
                             "score": self.scores})

    def frame(self) -> pd.DataFrame:
        """The whole table (built once, on first use)."""
        if self._frame is None:
            self._frame = self.block(0, len(self))
        return self._frame


def scores_table(user_table: pd.DataFrame, **columns) -> pd.DataFrame:
    """One row per sample, sorted by rank, irank's columns first and then the manifest's own (see RankedScores)."""
    return RankedScores(user_table, **columns).frame()
