"""Ranking: the rank order of scores (ties broken by id), class ranks, and runs of equal values."""

from __future__ import annotations

import numpy as np

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


def runs_of(same: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of equal neighbours, given the ascending places i where item i equals item i + 1."""
    if len(same) == 0:
        return []
    breaks = np.flatnonzero(np.diff(same) != 1)
    starts = np.concatenate([same[:1], same[breaks + 1]])
    ends = np.concatenate([same[breaks], same[-1:]]) + 2
    return list(zip(starts.tolist(), ends.tolist()))
