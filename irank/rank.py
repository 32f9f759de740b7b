"""Scores → influential ranks and the scores table people and later stages read."""

from __future__ import annotations

import numpy as np
import pandas as pd

FIRST_COLUMNS = [
    "rank", "id", "path", "label", "predicted", "label_prob", "predicted_prob", "loss", "score", "class_rank",
    "candidate_2", "candidate_2_prob", "candidate_3", "candidate_3_prob",
]
RUNNER_UPS = (2, 3)  # the model's 2nd and 3rd most probable classes, for annotators


def runner_up_columns(probs: np.ndarray, class_names: np.ndarray) -> dict[str, np.ndarray]:
    """candidate_K and candidate_K_prob: the K-th most probable class (ties: lower index first); empty when C < K."""
    order = np.argsort(-probs, axis=1, kind="stable")
    rows = np.arange(len(probs))
    columns: dict[str, np.ndarray] = {}
    for place in RUNNER_UPS:
        if probs.shape[1] >= place:
            index = order[:, place - 1]
            columns[f"candidate_{place}"] = class_names[index]
            columns[f"candidate_{place}_prob"] = probs[rows, index]
        else:
            columns[f"candidate_{place}"] = np.full(len(probs), "", dtype=object)
            columns[f"candidate_{place}_prob"] = np.full(len(probs), np.nan)
    return columns


def rank_order(scores: np.ndarray, ids: list[str]) -> np.ndarray:
    """Row indices from most to least influential; ties break by id so the order is deterministic."""
    return np.lexsort((np.asarray(ids, dtype=str), -np.asarray(scores, dtype=np.float64)))


def ranks(scores: np.ndarray, ids: list[str]) -> np.ndarray:
    """Rank of every row (1 = highest score)."""
    order = rank_order(scores, ids)
    result = np.empty(len(order), dtype=np.int64)
    result[order] = np.arange(1, len(order) + 1)
    return result


def class_ranks(scores: np.ndarray, ids: list[str], labels: np.ndarray) -> np.ndarray:
    """Rank of every row among the rows of its own given class."""
    result = np.empty(len(scores), dtype=np.int64)
    ids_array = np.asarray(ids, dtype=str)
    scores = np.asarray(scores, dtype=np.float64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        result[members] = ranks(scores[members], list(ids_array[members]))
    return result


def scores_table(
    user_table: pd.DataFrame,
    *,
    ids: list[str],
    paths: list[str],
    labels: np.ndarray,
    classes: list[str],
    probs: np.ndarray,
    loss: np.ndarray,
    scores: np.ndarray,
) -> pd.DataFrame:
    """One row per sample, sorted by rank, irank's columns first and then the manifest's own."""
    predicted = probs.argmax(axis=1)
    rows = np.arange(len(labels))
    class_names = np.asarray(classes, dtype=object)
    table = pd.DataFrame(
        {
            "rank": ranks(scores, ids),
            "id": ids,
            "path": paths,
            "label": class_names[labels],
            "predicted": class_names[predicted],
            "label_prob": probs[rows, labels],
            "predicted_prob": probs[rows, predicted],
            "loss": loss,
            "score": scores,
            "class_rank": class_ranks(scores, ids, labels),
            **runner_up_columns(probs, class_names),
        }
    )
    extra = user_table.drop(columns=[c for c in ("id", "path", "label") if c in user_table.columns])
    extra = extra.rename(columns={c: f"{c}_input" for c in extra.columns if c in FIRST_COLUMNS})
    table = pd.concat([table, extra.reset_index(drop=True)], axis=1)
    return table.sort_values("rank", kind="mergesort").reset_index(drop=True)
