"""Rows met in one order (a manifest read a block at a time) handed on in another (rank order), a block at a time.

`score` writes its table in rank order and `prune` its removed rows; both read the manifest's rows in
manifest order. Holding every row until the last is read would cost the whole table in memory (at ten
million rows, gigabytes of strings). Instead each piece of rows goes, as it is read, to one temporary file
per range of `block_rows` places in the output order; the files are then read back one at a time, sorted
and handed on. Memory: one block, whatever the number of rows.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd


def _take(item, mask_or_order):
    if item is None:
        return None
    return item.iloc[mask_or_order] if isinstance(item, pd.DataFrame) else item[mask_or_order]


def _join(items: list):
    if items[0] is None:
        return None
    return pd.concat(items) if isinstance(items[0], pd.DataFrame) else np.concatenate(items)


def in_output_order(pieces: Iterable[tuple[np.ndarray, tuple]], total: int, block_rows: int) -> Iterator[tuple]:
    """Regroup pieces of rows into output order, `block_rows` places at a time.

    `pieces`: (the rows' places in the output order, 0 .. total - 1, each place given once; a tuple of items
    with one entry per row: numpy arrays, DataFrames, or None). Yields, for each range of places in turn,
    the tuple of items of its rows sorted by place (with `total` at most `block_rows`, one tuple, built in
    memory). An empty output yields nothing.
    """
    if total <= block_rows:
        gathered = [(places, items) for places, items in pieces if len(places)]
        if gathered:
            yield _sorted([places for places, _ in gathered], [items for _, items in gathered])
        return
    with tempfile.TemporaryDirectory(prefix="irank-order-") as folder:
        for places, items in pieces:
            buckets = np.asarray(places) // block_rows
            for bucket in np.unique(buckets).tolist():
                mask = np.flatnonzero(buckets == bucket)
                piece = (places[mask], tuple(_take(item, mask) for item in items))
                with open(os.path.join(folder, str(bucket)), "ab") as handle:
                    pickle.dump(piece, handle, protocol=pickle.HIGHEST_PROTOCOL)
        for bucket in range(-(-total // block_rows)):
            path = os.path.join(folder, str(bucket))
            parts = []
            with open(path, "rb") as handle:
                while True:
                    try:
                        parts.append(pickle.load(handle))
                    except EOFError:
                        break
            os.remove(path)
            yield _sorted([places for places, _ in parts], [items for _, items in parts])


def _sorted(places: list[np.ndarray], items: list[tuple]) -> tuple:
    order = np.argsort(np.concatenate(places), kind="stable")
    return tuple(_take(_join([part[column] for part in items]), order) for column in range(len(items[0])))
