"""Tensor rows: manifest rows that point into `.npy` or `.safetensors` files instead of images.

A row's `path` names the file and its `index` column the row in it (the first axis); a `.safetensors`
file holding several tensors also needs a `key` column naming one. Text, audio and tabular inputs, or
precomputed embeddings for an MLP head, then run through every command the way images do.

Each file is opened once per process (DataLoader workers included) and a batch's rows of it are read
with positioned reads, one per run of consecutive rows (`rowfile.RowFile`; nothing is memory-mapped
but a Fortran-ordered `.npy`), so a million rows of one file cost no per-file work per row. Values come out as float32, as stored (no
image preprocessing applies).
"""

from __future__ import annotations

import itertools
import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from irank.formats.columns import StringSequence, code_type, codes_and_values, distinct, values_at
from irank.runtime.errors import ImageError, ManifestError
from irank.runtime.rowfile import RowFile, layout_of, npy_header

TENSOR_SUFFIXES = (".npy", ".safetensors")
OPEN_FILES = 64  # tensor files a process keeps open at once; the least recently read is closed first
SAFETENSORS_NUMERIC = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "BF16", "F32", "F64",
                       "F8_E4M3", "F8_E5M2"}


def tensor_row_mask(paths: Sequence[str]) -> np.ndarray:
    """For every path, whether it names a tensor file (by suffix, any case); each distinct path is looked at once."""
    codes, values = codes_and_values(paths)
    return np.array([is_tensor_path(path) for path in values], dtype=bool)[codes] if len(codes) else np.zeros(0, bool)


def is_tensor_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TENSOR_SUFFIXES)


def parse_indices(texts: Sequence[str], manifest: str, first_row: int = 0) -> np.ndarray:
    """The `index` column as int64, or a ManifestError naming the first row that is not a whole number ≥ 0
    (`first_row`: the 0-based manifest row of texts[0], for a block of a manifest)."""
    try:  # the fast path, one vectorized parse; the slow one below finds and names the first bad row
        indices = np.asarray(texts, dtype=str).astype(np.int64)
        if len(indices) == 0 or indices.min() >= 0:
            return indices
    except (ValueError, OverflowError):
        pass
    series = pd.Series(list(texts), dtype=object).astype(str).str.strip()
    valid = series.str.fullmatch(r"\+?\d{1,18}").to_numpy(dtype=bool)
    if not valid.all():
        at = int(np.flatnonzero(~valid)[0])
        value, row = series.iloc[at], first_row + at
        if not value:
            raise ManifestError(f"manifest {manifest}: row {row + 1} has an empty index")
        why = "is negative" if value.startswith("-") and value[1:].isdigit() else "is not a whole number"
        raise ManifestError(f"manifest {manifest}: row {row + 1}: index {value!r} {why} (the row in the tensor file, from 0)")
    return series.to_numpy(dtype=str).astype(np.int64)


def tensor_row_ids(paths: Sequence[str], keys: Sequence[str] | None, indices: np.ndarray) -> list[str]:
    """Default ids of tensor rows: `path[index]`, or `path[key][index]` where a key is given."""
    path_series = pd.Series(list(paths), dtype=object)
    index_text = "[" + pd.Series(indices).astype(str) + "]"
    if keys is None:
        return (path_series + index_text).tolist()
    key_series = pd.Series(list(keys), dtype=object)
    key_text = key_series.where(key_series == "", "[" + key_series + "]")
    return (path_series + key_text + index_text).tolist()


class TensorRowIds(StringSequence):
    """The default ids of tensor rows, as `tensor_row_ids` writes them, each made when it is read: a
    million of them held as strings take 70 MB (traced)."""

    def __init__(self, paths: Sequence[str], keys: Sequence[str] | None, indices: np.ndarray):
        self.paths, self.keys, self.indices = paths, keys, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[index] for index in range(*row.indices(len(self)))]
        key = self.keys[row] if self.keys is not None else ""
        return f"{self.paths[row]}{f'[{key}]' if key else ''}[{int(self.indices[row])}]"

    def values_at(self, rows: np.ndarray) -> list[str]:
        """The ids of the given rows (a block of the scores table), made together."""
        paths, indices = values_at(self.paths, rows), self.indices[rows].tolist()
        if self.keys is None:
            return [f"{path}[{index}]" for path, index in zip(paths, indices)]
        keys = values_at(self.keys, rows)
        return [f"{path}[{key}][{index}]" if key else f"{path}[{index}]" for path, key, index in zip(paths, keys, indices)]

    def first_duplicate(self) -> tuple[int, int] | None:
        """(earlier row, row), 0-based, of the first row whose id an earlier row has, or None.

        Compared as (file, key, index) codes, with no strings made, unless a path or key holds a bracket:
        then two different triples could spell one id (`a[k]` + `[1]` and `a` + key `k` + `[1]`), so the
        ids themselves are compared."""
        texts = itertools.chain(distinct(self.paths), distinct(self.keys) if self.keys is not None else ())
        if any("[" in text or "]" in text for text in texts):
            first: dict[str, int] = {}
            for row, sample_id in enumerate(self):
                if sample_id in first:
                    return first[sample_id], row
                first[sample_id] = row
            return None
        path_codes, path_values = codes_and_values(self.paths)
        key_codes, key_values = codes_and_values(self.keys) if self.keys is not None else (None, [""])
        indices = np.asarray(self.indices)
        span = int(indices.max(initial=0)) + 1  # indices are whole numbers from 0 (parse_indices)
        if len(path_values) * len(key_values) * span >= 2**62:  # no room for one number a row: compare the triples
            codes = pd.DataFrame({"path": path_codes, "key": key_codes if key_codes is not None else 0, "index": indices})
            later = codes.duplicated(keep="first").to_numpy()
            if not later.any():
                return None
            row = int(np.argmax(later))
            same = (codes.to_numpy() == codes.to_numpy()[row]).all(axis=1)
            return int(np.argmax(same)), row
        # one int64 a row for (file, key, index), sorted in place: 8 bytes a row, where an argsort and its gather
        # took 24 and pandas' duplicated() ~70; the rows of a repeated number are then looked for block by block
        def numbers(start: int, end: int) -> np.ndarray:
            number = np.asarray(path_codes[start:end], dtype=np.int64) * len(key_values)
            if key_codes is not None:
                number += np.asarray(key_codes[start:end], dtype=np.int64)
            number *= span
            number += indices[start:end]
            return number

        ordered = np.empty(len(indices), dtype=np.int64)
        for start in range(0, len(ordered), BUILD_ROWS):
            ordered[start:start + BUILD_ROWS] = numbers(start, start + BUILD_ROWS)
        ordered.sort()
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        del ordered
        if len(repeated) == 0:
            return None
        first_row: dict[int, int] = {}
        for start in range(0, len(indices), BUILD_ROWS):
            block = numbers(start, start + BUILD_ROWS)
            for row in (np.flatnonzero(np.isin(block, repeated)) + start).tolist():
                value = int(block[row - start])
                if value in first_row:
                    return first_row[value], row
                first_row[value] = row
        raise AssertionError("a repeated number was not found again")  # unreachable: the sort found it twice


@dataclass(frozen=True)
class TensorSource:
    """One (file, key) pair that rows of a manifest point into."""

    written: str  # the path as the manifest wrote it
    file: Path  # resolved against the manifest's folder
    key: str | None  # the tensor's name in a .safetensors file; None: the file's only tensor
    first_row: int  # 0-based, the first manifest row pointing here (for messages)

    def where(self, manifest: str, row: int | None = None) -> str:
        named = f"{self.written}" + (f" (key {self.key!r})" if self.key else "")
        return f"tensor file {named} (manifest {manifest}, row {(self.first_row if row is None else row) + 1})"


@dataclass(frozen=True)
class SourceLayout:
    """What a source holds: rows along the first axis, each of `row_shape`."""

    length: int
    row_shape: tuple[int, ...]
    dtype: str


BUILD_ROWS = 65_536  # rows grouped by source at a time


class TensorRows(Sequence):
    """The rows of a tensor manifest: for each row, its source (file and key) and its index there.

    As a sequence it yields each row's resolved file (like a list of image paths), so code that only
    needs paths keeps working; `make_loader` sees the type and reads tensors.
    """

    def __init__(self, manifest: str, sources: list[TensorSource], source_of_row: np.ndarray, index_of_row: np.ndarray):
        self.manifest = manifest
        self.sources = sources
        self.source_of_row = source_of_row
        self.index_of_row = index_of_row

    @classmethod
    def build(cls, manifest: str, root: Path, paths: Sequence[str], keys: Sequence[str] | None,
              indices: np.ndarray) -> "TensorRows":
        """Group rows by (path, key) with vectorized factorizing, a block of rows at a time (a sort of every
        row's pair took ~50 bytes a row); only distinct files are resolved."""
        path_codes, path_values = codes_and_values(paths)
        key_codes, key_values = (None, [""]) if keys is None else codes_and_values(keys)

        def pairs_of(start: int, end: int) -> np.ndarray:
            pairs = np.asarray(path_codes[start:end], dtype=np.int64) * len(key_values)
            return pairs if key_codes is None else pairs + np.asarray(key_codes[start:end], dtype=np.int64)

        first_of_pair: dict[int, int] = {}
        for start in range(0, len(path_codes), BUILD_ROWS):
            values, firsts = np.unique(pairs_of(start, start + BUILD_ROWS), return_index=True)
            for value, first in zip(values.tolist(), firsts.tolist()):
                first_of_pair.setdefault(value, start + first)
        unique_pairs = np.array(sorted(first_of_pair), dtype=np.int64)
        first_rows = np.array([first_of_pair[pair] for pair in unique_pairs.tolist()], dtype=np.int64)
        order = np.argsort(first_rows, kind="stable")  # sources in order of first appearance
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        if key_codes is None and np.array_equal(unique_pairs[order], np.arange(len(order))):
            source_of_row = path_codes  # the file codes are already the sources' numbers: share them, a byte a row
        else:
            source_of_row = np.empty(len(path_codes), dtype=code_type(len(order)))
            for start in range(0, len(path_codes), BUILD_ROWS):
                source_of_row[start:start + BUILD_ROWS] = rank[np.searchsorted(unique_pairs, pairs_of(start, start + BUILD_ROWS))]
        sources = []
        for position in order:
            pair, first = int(unique_pairs[position]), int(first_rows[position])
            written = str(path_values[pair // len(key_values)])
            key = str(key_values[pair % len(key_values)]) or None
            file = Path(written) if os.path.isabs(written) else root / written
            sources.append(TensorSource(written, file, key, first))
        return cls(manifest, sources, source_of_row, np.asarray(indices))  # the manifest's array, not a copy

    def __len__(self) -> int:
        return len(self.index_of_row)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(len(self)))]
        return self.sources[int(self.source_of_row[row])].file

    def where(self, row: int) -> str:
        """`tensor file X (manifest M, row R)` for a 0-based row."""
        return self.sources[int(self.source_of_row[row])].where(self.manifest, row)


def open_npy(file: Path):
    return np.load(file, mmap_mode="r", allow_pickle=False)


def release_pages(array) -> None:
    """Let the kernel take back the pages of a memory-mapped .npy that this process has read.

    Mapped file pages count as this process's resident memory once touched, so reading every row of a
    3 GB embedding file through a memmap would hold 3 GB. They are clean copies of the file (still in
    the page cache), so dropping them after each batch loses nothing: resident memory stays at a batch.
    """
    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)


def is_numeric(dtype: np.dtype) -> bool:
    return bool(np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.bool_))


def npy_header_dtype(file: Path) -> np.dtype | None:
    """The dtype a .npy header declares (None for a header version read only by np.load); ValueError
    when the file does not start with NumPy's magic bytes."""
    header = npy_header(file)
    return None if header is None else header[2]


def inspect_source(source: TensorSource) -> SourceLayout:
    """Read a source's header: length, row shape, dtype. Raises ValueError with the reason."""
    if not source.file.exists():
        raise ValueError("no such file")
    if source.file.is_dir():
        raise ValueError("is a folder, not a file")
    if not source.file.is_file():  # a FIFO, device or socket: opening or reading it could block forever
        raise ValueError("not a regular file (a named pipe, device or socket)")
    if source.file.name.lower().endswith(".npy"):
        if source.key:
            raise ValueError(f"a .npy file holds one array; leave 'key' empty (got {source.key!r})")
        try:
            dtype = npy_header_dtype(source.file)
        except OSError as exc:
            raise ValueError(f"cannot read ({exc.strerror or exc})") from None
        if dtype is not None and not is_numeric(dtype):
            raise ValueError(f"dtype {dtype} is not numeric")
        try:
            array = open_npy(source.file)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"not a readable .npy file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not is_numeric(array.dtype):
            raise ValueError(f"dtype {array.dtype} is not numeric")
        shape, dtype_name = tuple(array.shape), str(array.dtype)
    else:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(source.file), framework="pt") as handle:
                names = list(handle.keys())
                key = source.key
                if key is None:
                    if len(names) != 1:
                        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                        raise ValueError(f"holds {len(names)} tensors ({shown or 'none'}); name one in a 'key' column")
                    key = names[0]
                elif key not in names:
                    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                    raise ValueError(f"no tensor named {key!r} (tensors: {shown or 'none'})")
                tensor_slice = handle.get_slice(key)
                shape, dtype_name = tuple(tensor_slice.get_shape()), str(tensor_slice.get_dtype())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"not a readable .safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if dtype_name not in SAFETENSORS_NUMERIC:
            raise ValueError(f"dtype {dtype_name} is not numeric")
    if len(shape) == 0:
        raise ValueError("holds a single number; expected one row per sample along the first axis")
    return SourceLayout(length=int(shape[0]), row_shape=shape[1:] or (1,), dtype=dtype_name)


def inspect_rows(rows: TensorRows) -> tuple[list[SourceLayout | None], np.ndarray, np.ndarray, list[str]]:
    """Every source's layout (None where unreadable); the rows that cannot be read, ascending; for each of
    them an index into the list of reasons; that list. No tensor data is read, only headers, and rows are
    looked at a block at a time (a problem code for every row took 8 bytes a row, and the checks as many again)."""
    layouts: list[SourceLayout | None] = []
    reasons: list[str] = []
    source_problem = np.full(len(rows.sources), -1, dtype=np.int64)
    for number, source in enumerate(rows.sources):
        try:
            layouts.append(inspect_source(source))
        except ValueError as exc:
            layouts.append(None)
            source_problem[number] = len(reasons)
            reasons.append(str(exc))
    lengths = np.array([layout.length if layout else np.iinfo(np.int64).max for layout in layouts], dtype=np.int64)
    bad_rows, bad_reasons = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(rows), BUILD_ROWS):
        source = rows.source_of_row[start:start + BUILD_ROWS]
        index = rows.index_of_row[start:start + BUILD_ROWS]
        problem = source_problem[source]
        for row in np.flatnonzero((problem < 0) & (index >= lengths[source])).tolist():
            problem[row] = len(reasons)
            length = lengths[source[row]]
            reasons.append(f"index {index[row]} is out of range ({length} rows, 0 to {length - 1})")
        flagged = np.flatnonzero(problem >= 0)
        bad_rows.append(flagged + start)
        bad_reasons.append(problem[flagged])
    return layouts, np.concatenate(bad_rows), np.concatenate(bad_reasons), reasons


def bad_tensor_rows(rows: TensorRows) -> list[dict]:
    """Rows that cannot be read, as {row (1-based), path, reason}, like `find_bad_images`."""
    _, bad, why, reasons = inspect_rows(rows)
    return [{"row": row + 1, "path": str(rows[row]), "reason": f"{rows.where(row)}: {reasons[code]}"}
            for row, code in zip(bad.tolist(), why.tolist())]


def check_tensor_rows(rows: TensorRows) -> tuple[int, ...]:
    """The shape every row shares; ImageError naming file and row for the first unreadable row, or
    ManifestError when rows differ in shape."""
    layouts, bad, why, reasons = inspect_rows(rows)
    if len(bad):
        raise ImageError(f"{rows.where(int(bad[0]))}: {reasons[why[0]]}")
    used = np.zeros(len(rows.sources), dtype=bool)
    for start in range(0, len(rows), BUILD_ROWS):
        used[rows.source_of_row[start:start + BUILD_ROWS]] = True
    first = None
    for number in np.flatnonzero(used):
        source, layout = rows.sources[number], layouts[number]
        if first is None:
            first = (source, layout)
        elif layout.row_shape != first[1].row_shape:
            raise ManifestError(
                f"manifest {rows.manifest}: tensor rows differ in shape: {shape_text(first[1].row_shape)} in "
                f"{first[0].written} (row {first[0].first_row + 1}) and {shape_text(layout.row_shape)} in "
                f"{source.written} (row {source.first_row + 1}); every row must have one shape"
            )
    return first[1].row_shape if first else (1,)


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(size) for size in shape)


class TensorDataset(Dataset):
    """Tensor rows of a manifest; each item is (float32 tensor or None, row, error message or None),
    like `ImageDataset`. A batch is read with `__getitems__`: one indexing call per file."""

    def __init__(self, tensor_rows: TensorRows, row_shape: tuple[int, ...], rows: list[int] | None = None):
        self.tensor_rows = tensor_rows
        self.row_shape = tuple(row_shape)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        # per process: file (and key) → its RowFile (or memmap), the most recently read last
        self._readers: OrderedDict = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = OrderedDict()  # each DataLoader worker opens its own files
        return state

    def __len__(self) -> int:
        return len(self.tensor_rows) if self.rows is None else len(self.rows)

    def __getitem__(self, item: int):
        return self.__getitems__([item])[0]

    def _reader(self, source: TensorSource) -> "RowFile | np.ndarray":
        """The open file of a source: a `RowFile` (positioned reads), or for a .npy that cannot be read row by
        row from its bytes (Fortran order, a newer header) a memory map. At most OPEN_FILES stay open: a
        manifest of one file per sample would otherwise run out of file descriptors (1,024 by default)."""
        cache_key = (source.file, source.key)
        reader = self._readers.pop(cache_key, None)
        if reader is None:
            layout = layout_of(source.file, source.key)
            reader = open_npy(source.file) if layout is None else RowFile(source.file, layout)
            while len(self._readers) >= OPEN_FILES:
                _, oldest = self._readers.popitem(last=False)
                if isinstance(oldest, RowFile):
                    oldest.close()  # a memory map closes when it is dropped
        self._readers[cache_key] = reader
        return reader

    def _read(self, source: TensorSource, indices: np.ndarray) -> torch.Tensor:
        reader = self._reader(source)
        if isinstance(reader, RowFile):
            block = reader.read(indices)
        else:
            block = torch.from_numpy(np.ascontiguousarray(reader[indices], dtype=np.float32))  # fancy indexing copies
            release_pages(reader)
        return block.reshape(len(indices), *self.row_shape)

    def __getitems__(self, items):
        rows = np.asarray(items, dtype=np.int64) if self.rows is None else self.rows[np.asarray(items, dtype=np.int64)]
        source_of_row = self.tensor_rows.source_of_row[rows]
        index_of_row = self.tensor_rows.index_of_row[rows]
        numbers = np.unique(source_of_row)
        values = torch.empty((len(rows), *self.row_shape), dtype=torch.float32)
        errors: dict[int, str] = {}
        for number in numbers:
            members = np.flatnonzero(source_of_row == number) if len(numbers) > 1 else np.arange(len(rows))
            source = self.tensor_rows.sources[int(number)]
            try:
                block = self._read(source, index_of_row[members].astype(np.int64))
            except (OSError, ValueError, RuntimeError, IndexError) as exc:  # the file changed since it was checked
                first = int(rows[members[0]])
                message = f"{self.tensor_rows.where(first)}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                errors.update({int(member): message for member in members})
                continue
            if len(numbers) == 1:
                values = block
            else:
                values.index_copy_(0, torch.from_numpy(members), block)
        row_numbers = rows.tolist()
        if errors:
            return [(None, row, errors[place]) if place in errors else (values[place], row, None)
                    for place, row in enumerate(row_numbers)]
        return list(zip(values.unbind(0), row_numbers, [None] * len(row_numbers)))
