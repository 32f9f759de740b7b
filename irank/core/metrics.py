"""Metrics: detection against known corruption (AUROC, precision at k) and the accuracy of predictions."""

from __future__ import annotations

import numpy as np
import torch


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive` (ties count one half)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    num_pos, num_neg = int(positive.sum()), int((~positive).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def precision_at_k(order: np.ndarray, positive: np.ndarray, k: int | None = None) -> float:
    """Share of positives among the first k rows of `order` (default k = number of positives)."""
    positive = np.asarray(positive, dtype=bool)
    k = int(positive.sum()) if k is None else k
    if k == 0:
        return float("nan")
    return float(positive[np.asarray(order)[:k]].mean())


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Overall accuracy and, for every class present, its accuracy and count."""
    correct = logits.argmax(dim=1) == labels
    per_class = {}
    for index, name in enumerate(classes):
        members = labels == index
        count = int(members.sum())
        if count:
            per_class[name] = {"accuracy": float(correct[members].float().mean()), "count": count}
    return {"accuracy": float(correct.float().mean()), "num_samples": len(labels), "per_class": per_class}
