"""Selection: which rows to remove (or flag) given their scores and ranks. Arrays in, a boolean mask out."""

from __future__ import annotations

import numpy as np


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
    if sum(rule is not None for rule in (fraction, count, min_score)) != 1:
        raise ValueError("give exactly one of fraction, count or min_score")
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
