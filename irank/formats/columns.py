"""Columns of strings for a million rows, held compactly, and a duplicate check that needs no set of them.

A list of a million Python strings costs about 60 bytes a row beside the text (object header, list slot);
a manifest read into pandas costs that for every column. irank keeps of a manifest only what it reads:
  - `TextColumn`: distinct-per-row strings (image paths, ids) as one UTF-8 byte string and 8-byte offsets;
  - `CodedColumn`: strings with few distinct values (labels, tensor files, keys) as integer codes (of the
    smallest type that holds them: a byte a row for up to 256 values) and the values.
Both are read-only sequences of `str`, so code written for lists keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

ITER_ROWS = 65_536  # rows decoded at a time when a column is iterated


class StringSequence(Sequence):
    """Equal to any list, tuple or column of the same strings, as a list would be."""

    __hash__ = None

    def __eq__(self, other) -> bool:
        if not isinstance(other, (list, tuple, StringSequence)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))


class TextColumn(StringSequence):
    """Strings as one UTF-8 byte string plus each one's end offset: the text's bytes and 8 more a row."""

    def __init__(self, blob: bytes, offsets: np.ndarray):
        self.blob = blob
        self.offsets = offsets  # int64, len + 1: string i is blob[offsets[i]:offsets[i + 1]]

    @classmethod
    def of(cls, values: Iterable[str]) -> "TextColumn":
        builder = TextColumnBuilder()
        builder.add(list(values))
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[index] for index in range(*row.indices(len(self)))]
        row = int(row)
        if row < 0:
            row += len(self)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} outside 0..{len(self) - 1}")
        return self.blob[self.offsets[row]:self.offsets[row + 1]].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        ends = self.offsets.tolist() if len(self) <= ITER_ROWS else None
        for start in range(0, len(self), ITER_ROWS):
            bounds = ends[start:start + ITER_ROWS + 1] if ends is not None else \
                self.offsets[start:start + ITER_ROWS + 1].tolist()
            blob = self.blob
            for first, last in zip(bounds[:-1], bounds[1:]):
                yield blob[first:last].decode("utf-8")

    def take(self, rows: Sequence[int]) -> "TextColumn":
        return TextColumn.of(self[int(row)] for row in rows)

    def __repr__(self) -> str:
        return f"TextColumn({len(self)} rows, {len(self.blob):,} bytes)"


class TextColumnBuilder:
    """Appends blocks of strings; `build` joins them into one TextColumn."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.lengths: list[np.ndarray] = []

    def add(self, values: list[str]) -> None:
        encoded = [value.encode("utf-8") for value in values]
        self.parts.append(b"".join(encoded))
        self.lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))

    def build(self) -> TextColumn:
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = b"".join(self.parts)
        self.parts, self.lengths = [], []
        return TextColumn(blob, offsets)


def code_type(count: int) -> type:
    """The smallest integer type for codes 0 .. count - 1 (uint8, uint16, else int32): at ten million rows,
    10 MB where int32 took 40."""
    return np.uint8 if count <= 2**8 else np.uint16 if count <= 2**16 else np.int32


def compact_codes(codes: np.ndarray, count: int) -> np.ndarray:
    """Codes 0 .. count - 1 as `code_type(count)`."""
    dtype = code_type(count)
    return codes if codes.dtype == dtype else codes.astype(dtype)


def int32_if_fits(values: np.ndarray) -> np.ndarray:
    """Whole numbers as int32 where they all fit (half of int64's bytes), else as they are."""
    if values.dtype != np.int32 and (len(values) == 0 or (int(values.min()) >= -2**31 and int(values.max()) < 2**31)):
        return values.astype(np.int32)
    return values


class CodedColumn(StringSequence):
    """Strings with few distinct values: a code a row (`compact_codes`) and the list of values."""

    def __init__(self, codes: np.ndarray, values: list[str]):
        self.codes = codes
        self.values = values

    @classmethod
    def of(cls, values: Iterable[str]) -> "CodedColumn":
        builder = CodedColumnBuilder()
        builder.add(list(values))
        return builder.build()

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self.values[code] for code in self.codes[row].tolist()]
        return self.values[int(self.codes[row])]

    def __iter__(self) -> Iterator[str]:
        values = self.values
        for start in range(0, len(self), ITER_ROWS):
            for code in self.codes[start:start + ITER_ROWS].tolist():
                yield values[code]

    def take(self, rows: Sequence[int]) -> "CodedColumn":
        """The given rows; only the values they use are kept."""
        used, codes = np.unique(self.codes[np.asarray(rows, dtype=np.int64)], return_inverse=True)
        return CodedColumn(compact_codes(codes.reshape(-1), len(used)), [self.values[code] for code in used.tolist()])

    def __repr__(self) -> str:
        return f"CodedColumn({len(self)} rows, {len(self.values)} values)"


class CodedColumnBuilder:
    def __init__(self):
        self.position: dict[str, int] = {}
        self.values: list[str] = []
        self.codes: list[np.ndarray] = []

    def add(self, values: list[str]) -> None:
        codes, distinct = pd.factorize(pd.Series(values, dtype=object), sort=False)
        mapping = np.fromiter((self._code(value) for value in distinct), dtype=np.int64, count=len(distinct))
        # each block in the smallest type for the values so far: `build` copies them into the final type
        self.codes.append(compact_codes(mapping[codes], len(self.values)) if len(codes) else np.zeros(0, dtype=np.uint8))

    def _code(self, value: str) -> int:
        if value not in self.position:
            self.position[value] = len(self.values)
            self.values.append(value)
        return self.position[value]

    def build(self) -> CodedColumn:
        codes = np.empty(sum(map(len, self.codes)), dtype=code_type(len(self.values)))
        start = 0
        for block in self.codes:  # block by block into the compact array: no int32 copy of every row's
            codes[start:start + len(block)] = block
            start += len(block)
        self.codes = []
        return CodedColumn(codes, self.values)


def values_at(column: Sequence[str], rows: np.ndarray) -> list[str]:
    """column[row] for every row of `rows`, in one vectorized step where the column's type allows."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(column, CodedColumn):
        return np.asarray(column.values, dtype=object)[column.codes[rows]].tolist() if len(rows) else []
    if isinstance(column, TextColumn):
        blob = column.blob
        return [blob[first:last].decode("utf-8")
                for first, last in zip(column.offsets[rows].tolist(), column.offsets[rows + 1].tolist())]
    if hasattr(column, "values_at"):
        return column.values_at(rows)
    return [column[row] for row in rows.tolist()]


def codes_and_values(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """(a code per row, the distinct values) of a column: a CodedColumn's own, else factorized."""
    if isinstance(values, CodedColumn):
        return values.codes, values.values
    codes, distinct = pd.factorize(pd.Series(list(values), dtype=object), sort=False)
    return codes, list(distinct)


def distinct(values: Sequence[str]) -> list[str]:
    """The distinct strings of a column (of a CodedColumn: its values list, with no pass over the rows)."""
    return list(values.values) if isinstance(values, CodedColumn) else list(dict.fromkeys(values))


def text_hashes(values: list[str]) -> np.ndarray:
    """A 64-bit hash of each string (pandas' vectorized hash: the same string, the same hash, in any block)."""
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False) if len(values) else np.zeros(0, dtype=np.uint64)


def first_duplicate(values: Sequence[str], hashes: np.ndarray) -> tuple[int, int] | None:
    """(earlier row, row), 0-based, of the first row whose string an earlier row has, or None.

    Only the rows that share a 64-bit hash (`text_hashes` of `values`) are compared as strings, so no set
    of a million strings is built; a collision of two different strings is told apart there. Their strings
    are asked for once, with `values_at` (`values` may be an object that reads them again from a file).
    """
    ordered = np.sort(hashes)  # one copy of the hashes: an argsort and its gather took two
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if len(repeated) == 0:
        return None
    rows_of_hash: dict[int, list[int]] = {}  # the rows of each repeated hash, ascending, found a block at a time
    for start in range(0, len(hashes), ITER_ROWS):
        block = hashes[start:start + ITER_ROWS]
        at = np.minimum(np.searchsorted(repeated, block), len(repeated) - 1)
        for row in (np.flatnonzero(repeated[at] == block) + start).tolist():
            rows_of_hash.setdefault(int(hashes[row]), []).append(row)
    candidates = np.array(sorted(row for rows in rows_of_hash.values() for row in rows), dtype=np.int64)
    text_of = dict(zip(candidates.tolist(), values_at(values, candidates)))
    best: tuple[int, int] | None = None
    for rows in rows_of_hash.values():
        first_row: dict[str, int] = {}
        for row in rows:
            if best is not None and row >= best[1]:
                break
            text = text_of[row]
            if text in first_row:
                best = (first_row[text], row)
                break
            first_row[text] = row
    return best


class TextIndex:
    """The row of each string of a column that holds each string once, found by 64-bit hash: the column's
    hashes sorted and the rows in that order (12 bytes a row, where a dict of its strings took ~100), each
    match then checked string by string; where two strings share a hash, the rows of that hash are compared
    one by one. `hash_of`: text_hashes (tests pass a weaker one)."""

    def __init__(self, column: Sequence[str], block_rows: int = ITER_ROWS, hash_of=None):
        self.column, self.hash_of = column, hash_of or text_hashes
        count = len(column)
        hashes = np.empty(count, dtype=np.uint64)
        for start in range(0, count, block_rows):  # a TextColumn of a million ids is never a list of them
            hashes[start:start + block_rows] = self.hash_of(values_at(column, np.arange(start, min(start + block_rows, count))))
        order = np.argsort(hashes)  # rows of one hash in any order: each is compared below
        self.order = order.astype(np.int32) if count < 2**31 else order
        del order
        hashes.sort()  # in place: the values of hashes[order], without a second array of them
        self.ordered = hashes

    def __len__(self) -> int:
        return len(self.column)

    def rows_of(self, texts: list[str]) -> np.ndarray:
        """The column's row of each of `texts` (int64; -1 where it holds none)."""
        count, ordered, order, column = len(self.column), self.ordered, self.order, self.column
        if count == 0 or len(texts) == 0:
            return np.full(len(texts), -1, dtype=np.int64)
        wanted_hashes = self.hash_of(texts)
        at = np.minimum(np.searchsorted(ordered, wanted_hashes), count - 1)
        block = np.where(ordered[at] == wanted_hashes, order[at], -1).astype(np.int64)
        found = np.flatnonzero(block >= 0)
        for place, text in zip(found.tolist(), values_at(column, block[found])):
            if text != texts[place]:  # another string with the same hash: look through every row of that hash
                block[place] = -1
                first = int(at[place])
                while first < count and ordered[first] == wanted_hashes[place]:
                    if column[int(order[first])] == texts[place]:
                        block[place] = order[first]
                        break
                    first += 1
        return block

