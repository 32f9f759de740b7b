"""Manifests: read, validate and write the tables that list a data set's samples.

A manifest has one row per sample with a `path` (relative to the manifest's folder, or absolute)
and a `label` (a class name or an integer index), and optionally an `id` (default: the path).
Rows are all images, or all tensor rows: `path` a `.npy` or `.safetensors` file, an `index` column
the row in it, an optional `key` column the tensor's name (default id: `path[index]`).
Every other column is the user's and is carried through every stage untouched.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from irank.formats.columns import (
    CodedColumn,
    CodedColumnBuilder,
    TextColumnBuilder,
    codes_and_values,
    distinct,
    first_duplicate,
    int32_if_fits,
    text_hashes,
)
from irank.formats.files import atomic_path, is_stdio, sha256_file
from irank.formats.jsontext import JsonError
from irank.formats.jsontext import parse as parse_json
from irank.formats.seal import sealed_root
from irank.formats.tensor_rows import TensorRowIds, TensorRows, parse_indices, tensor_row_ids, tensor_row_mask
from irank.runtime.errors import ManifestError

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def table_format(path: str | os.PathLike) -> str:
    if is_stdio(path):
        return "csv"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise ManifestError(f"{path}: unknown table format {suffix or '(no extension)'!r}; use one of {known}")
    return FORMATS[suffix]


CHUNK_ROWS = 65_536  # rows of a manifest parsed at a time


@contextmanager
def table_errors(what: str, name: str, fmt: str):
    """Turn the parser's exceptions into one-line ManifestErrors naming the file."""
    try:
        yield
    except ManifestError:
        raise
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{what} {name}: the file is empty") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what} {name}: not valid UTF-8 text (byte {exc.start})") from None
    except (pd.errors.ParserError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(f"{what} {name}: cannot parse as {fmt}: {first_line}") from None
    except OSError as exc:
        raise ManifestError(f"{what} {name}: cannot read: {exc.strerror or exc}") from None


def table_input(path: str | os.PathLike, what: str):
    """What a table is read from: stdin's bytes for '-', else the path, once it is known to be a file."""
    if is_stdio(path):
        return sys.stdin.buffer
    if not Path(path).exists():
        raise ManifestError(f"{what} {path}: no such file")
    if Path(path).is_dir():
        raise ManifestError(f"{what} {path}: is a folder, not a file")
    return path


def _named_columns(table: pd.DataFrame, columns: tuple[str, ...] | None) -> pd.DataFrame:
    table.columns = [str(column) for column in table.columns]
    if columns is not None:
        table = table[[column for column in table.columns if column in columns]]
    return table


def _csv_options(fmt: str, columns: tuple[str, ...] | None) -> dict:
    """How pandas reads irank's CSV and TSV: every value a string, as written (no NaN, no number parsing)."""
    return {"sep": "\t" if fmt == "tsv" else ",", "dtype": str, "keep_default_na": False, "encoding": "utf-8-sig",
            "usecols": None if columns is None else (lambda column: column in columns)}


def header_names(source, fmt: str, what: str, name: str) -> list[str] | None:
    """The names in a CSV or TSV header as written (pandas calls an empty name "Unnamed: 3" and a repeated one
    "x.1"); None where the source cannot be read twice (a pipe). A name written twice is refused: a table that
    holds two columns of one name cannot be carried through unchanged."""
    if isinstance(source, (str, os.PathLike)):
        seekable = stat.S_ISREG(os.stat(source).st_mode)  # a named pipe reads once
    else:
        seekable = hasattr(source, "seekable") and source.seekable()
    if not seekable:
        return None
    at = None if isinstance(source, (str, os.PathLike)) else source.tell()
    options = {**_csv_options(fmt, None), "usecols": None}
    try:
        names = pd.read_csv(source, header=None, nrows=1, **options).iloc[0].tolist()
    finally:
        if at is not None:
            source.seek(at)
    seen: dict[str, int] = {}
    for place, column in enumerate(names, start=1):
        if column in seen:
            raise ManifestError(f"{what} {name}: the header names the column {column!r} twice (columns {seen[column]} "
                                f"and {place}); rename one")
        seen[column] = place
    return names


def _check_fields(chunk: pd.DataFrame, start: int, what: str, name: str) -> None:
    """pandas reads rows with more fields than the header by making the first fields an index: refuse them."""
    if not isinstance(chunk.index, pd.RangeIndex):
        raise ManifestError(f"{what} {name}: row {start + 1} has more fields than the header "
                            "(a separator inside a value that is not quoted?)")


def iter_table(source, fmt: str, *, what: str, name: str, columns: tuple[str, ...] | None = None,
               chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
    """A table (a path or an open binary file) in blocks of `chunk_rows` rows, values as the user wrote them.

    CSV and TSV are parsed a block at a time; JSONL and Parquet are read whole and handed out in blocks.
    A table with a header and no rows gives one empty block (its columns)."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    with table_errors(what, name, fmt):
        if fmt in ("csv", "tsv"):
            options = _csv_options(fmt, columns)
            names = header_names(source, fmt, what, name)
            if names is not None:
                options.update(header=0, names=names)
            start = 0
            with pd.read_csv(source, chunksize=chunk_rows, **options) as reader:
                for chunk in reader:
                    _check_fields(chunk, start, what, name)
                    start += len(chunk)
                    yield _named_columns(chunk, columns)
            return
        if fmt == "jsonl":
            table = read_jsonl(source, what, name)
        else:
            try:
                table = pd.read_parquet(source)
            except ImportError as exc:
                raise ManifestError(f"{what} {name}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    table = _named_columns(table, columns)
    for start in range(0, max(len(table), 1), chunk_rows):
        yield table.iloc[start:start + chunk_rows]


def _jsonl_lines(data: bytes, what: str, name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of a JSON Lines file that is not blank."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{what} {name}: line {number}: not valid UTF-8 text (byte {exc.start + 1} of the line)") from None
        if text.strip():
            yield number, text


TEXT_KEYS = frozenset(("id", "path", "label", "index", "key"))  # read as text; a list, object or true/false is refused


def read_jsonl(source, what: str, name: str) -> pd.DataFrame:
    """A JSON Lines table: one object per line, every value as JSON gives it (strings, whole numbers, floats as
    written, true/false, null, lists and objects), in object columns ordered by first appearance; a key a line
    lacks reads as null. A line that is not an object, or not strict JSON (NaN, a repeated key, a number too
    large, nesting too deep), is refused naming the line and column."""
    from irank.formats.jsontext import JsonError, kind, parse

    data = source.read() if hasattr(source, "read") else Path(source).read_bytes()
    records: list[dict] = []
    keys: dict[str, None] = {}
    for number, text in _jsonl_lines(data, what, name):
        try:
            record = parse(text)
        except JsonError as exc:
            raise ManifestError(f"{what} {name}: line {number}, column {exc.column}: not JSON: {exc.message}") from None
        if not isinstance(record, dict):
            raise ManifestError(f"{what} {name}: line {number}: {kind(record)}, where each line must hold a JSON "
                                "object ({\"path\": ..., \"label\": ...})")
        for key in TEXT_KEYS.intersection(record):
            if isinstance(record[key], (dict, list, bool)):
                raise ManifestError(f"{what} {name}: line {number}: {key} is {kind(record[key])}; irank reads {key} as "
                                    "text: a string or a number")
        keys.update(dict.fromkeys(record))
        records.append(record)
    if not records:
        raise ManifestError(f"{what} {name}: the file is empty (no JSON lines)")
    return pd.DataFrame({key: pd.Series([record.get(key) for record in records], dtype=object) for key in keys})


def read_table(path: str | os.PathLike, *, what: str = "manifest", columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet table (or CSV from stdin for '-'), values kept as the user wrote them.

    With `columns`, only those of them the table has are kept (CSV/TSV: the others are never parsed).
    """
    fmt = table_format(path)
    source = table_input(path, what)
    if is_stdio(path):
        source = io.BytesIO(source.read())
    return pd.concat(list(iter_table(source, fmt, what=what, name=str(path), columns=columns,
                                     chunk_rows=1 << 62)), ignore_index=True)


class TableSource:
    """A table that can be read again, a block of rows at a time: its file, or stdin (or a pipe) copied to a
    temporary file on the first read (removed when this object goes)."""

    def __init__(self, path: str | os.PathLike, what: str = "manifest"):
        self.name, self.what = str(path), what
        self._spool = None
        if what == "manifest" and not is_stdio(path) and os.path.isdir(path):  # an ImageFolder: its listing
            self.format = "csv"
            self._spool = tempfile.TemporaryFile(prefix="irank-folder-")
            self._spool.write(folder_table(path).to_csv(index=False).encode("utf-8"))
            return
        self.format = table_format(path)
        source = table_input(path, what)
        if is_stdio(path):
            self._spool = tempfile.TemporaryFile(prefix="irank-stdin-")
            shutil.copyfileobj(source, self._spool)
            return
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe (`<(command)`) reads once: keep a copy
            self._spool = tempfile.TemporaryFile(prefix="irank-pipe-")
            try:
                with open(path, "rb") as pipe:
                    shutil.copyfileobj(pipe, self._spool)
            except OSError as exc:
                raise ManifestError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None

    def sha256(self) -> str:
        """The sha256 of the table's bytes: of its copy for stdin or a pipe, which give their bytes once (opening the
        pipe again to hash it waited for a writer forever)."""
        if self._spool is None:
            return sha256_file(self.name)
        self._spool.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: self._spool.read(1 << 20), b""):
            digest.update(block)
        return digest.hexdigest()

    def chunks(self, columns: tuple[str, ...] | None = None, chunk_rows: int | None = None) -> Iterator[pd.DataFrame]:
        if self._spool is not None:
            self._spool.seek(0)
        source = self._spool if self._spool is not None else self.name
        yield from iter_table(source, self.format, what=self.what, name=self.name, columns=columns,
                              chunk_rows=chunk_rows)


def column_as_text(table: pd.DataFrame, column: str) -> list[str]:
    """A column's values as strings, as the user wrote them (JSON numbers without a trailing .0)."""
    values = table[column].tolist()
    if pd.api.types.infer_dtype(values, skipna=False) in ("string", "empty"):  # CSV and TSV: all strings already
        return values
    values, given = [], values
    for value in given:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        values.append("" if value is None else str(value))
    return values


class ImagePaths(Sequence):
    """The image rows' files, each resolved against the manifest's folder when it is read: a list of a
    million Path objects would hold 283 MB (traced), these hold nothing but the paths as written."""

    def __init__(self, root: Path, written: Sequence[str]):
        self.root, self.written = root, written

    def __len__(self) -> int:
        return len(self.written)

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[index] for index in range(*row.indices(len(self)))]
        written = self.written[row]
        return Path(written) if os.path.isabs(written) else self.root / written


@dataclass
class Manifest:
    """A validated manifest: the columns irank reads from it, held compactly (see `columns.py`), and the file
    to read the user's whole table from again when it is written out (`chunks`), so the table itself is not
    kept: at a million rows pandas holds ~200 bytes a row of it."""

    source: str
    root: Path
    ids: Sequence[str]  # TextColumn (an id column), TensorRowIds (made), or `paths` (images without ids)
    paths: Sequence[str]  # as written: TextColumn (images) or CodedColumn (tensor files)
    labels: Sequence[str]  # CodedColumn; "" for every row when labels were not required and are missing
    columns: list[str]  # the user's columns, in order
    table_source: TableSource | None = field(default=None, repr=False, compare=False)
    tensor_index: np.ndarray | None = None  # tensor rows: the `index` column (int32 where it fits); None for images
    tensor_keys: Sequence[str] | None = None  # tensor rows with a `key` column: its values ("" = the only tensor)
    carriage_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # rows with a "\r" in a value
    kept_rows: np.ndarray | None = None  # after `subset`: the rows of the table on disk, in order
    _resolved: "ImagePaths | TensorRows | None" = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def holds_tensors(self) -> bool:
        return self.tensor_index is not None

    @property
    def carriage_return(self) -> bool:
        """Whether a value or a column's name holds a "\r" (then CSV output quotes every field: see `csv_quoting`)."""
        return len(self.carriage_rows) > 0 or any("\r" in str(column) for column in self.columns)

    def chunks(self, columns: tuple[str, ...] | None = None,
               chunk_rows: int | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
        """The user's table read again from its file: (row of the block's first row, block), in row order;
        `columns`: only those."""
        chunk_rows = chunk_rows or CHUNK_ROWS
        if self.kept_rows is not None:  # a subset (rare: rows skipped as unreadable): read whole, then take
            whole = pd.concat(list(self.table_source.chunks(columns, chunk_rows)), ignore_index=True)
            if len(whole) <= int(self.kept_rows.max(initial=-1)):
                raise ManifestError(f"manifest {self.source}: changed while irank ran ({len(whole)} rows now)")
            whole = whole.take(self.kept_rows)
            for start in range(0, max(len(whole), 1), chunk_rows):
                yield start, whole.iloc[start:start + chunk_rows].reset_index(drop=True)
            return
        start = 0
        for chunk in self.table_source.chunks(columns, chunk_rows):
            self._check_rows(start + len(chunk))
            yield start, chunk.reset_index(drop=True)
            start += len(chunk)
        if start != len(self):
            raise ManifestError(f"manifest {self.source}: changed while irank ran ({start} rows now, {len(self)} before)")

    def _check_rows(self, rows: int) -> None:
        if rows > len(self):
            raise ManifestError(f"manifest {self.source}: changed while irank ran (more than {len(self)} rows now)")

    def paths_at(self, mask: np.ndarray) -> Iterator[str]:
        """The paths of the rows where `mask` is true, as written, one at a time (for `path_rebaser`, which stops
        at the first that changes): each distinct path once where the column is coded (tensor files), else
        row by row, a block of rows at a time (a list of ten million row numbers took 290 MB)."""
        mask = np.asarray(mask, dtype=bool)
        if isinstance(self.paths, CodedColumn):
            used = np.zeros(len(self.paths.values), dtype=bool)
            for start in range(0, len(mask), CHUNK_ROWS):
                used[self.paths.codes[start:start + CHUNK_ROWS][mask[start:start + CHUNK_ROWS]]] = True
            yield from (self.paths.values[code] for code in np.flatnonzero(used).tolist())
            return
        for start in range(0, len(mask), CHUNK_ROWS):
            for row in (np.flatnonzero(mask[start:start + CHUNK_ROWS]) + start).tolist():
                yield self.paths[row]

    @property
    def table(self) -> pd.DataFrame:
        """The user's whole table, read again from its file (at a million rows, hundreds of MB: prefer `chunks`)."""
        return pd.concat([chunk for _, chunk in self.chunks()], ignore_index=True)

    def subset(self, rows: list[int]) -> "Manifest":
        """The same manifest with only `rows` (0-based), in their order."""
        rows = np.asarray(rows, dtype=np.int64)
        paths = self.paths.take(rows)
        if isinstance(self.ids, TensorRowIds):
            ids = None
        else:
            ids = paths if self.ids is self.paths else self.ids.take(rows)
        keys = None if self.tensor_keys is None else self.tensor_keys.take(rows)
        index = None if self.tensor_index is None else self.tensor_index[rows]
        if ids is None:
            ids = TensorRowIds(paths, keys, index)
        kept = rows if self.kept_rows is None else self.kept_rows[rows]
        return Manifest(source=self.source, root=self.root, ids=ids, paths=paths, labels=self.labels.take(rows),
                        columns=self.columns, table_source=self.table_source, tensor_index=index, tensor_keys=keys,
                        carriage_rows=np.flatnonzero(np.isin(rows, self.carriage_rows)), kept_rows=kept)

    def resolved_paths(self) -> "ImagePaths | TensorRows":
        """Each row's file resolved against the manifest's folder: a sequence of image paths, or for tensor
        rows a TensorRows (a sequence of the same paths that also carries each row's index and key). Built
        once per manifest."""
        if self._resolved is None:
            if self.tensor_index is not None:
                self._resolved = TensorRows.build(self.source, self.root, self.paths, self.tensor_keys, self.tensor_index)
            else:
                self._resolved = ImagePaths(self.root, self.paths)
        return self._resolved


def default_ids(table: pd.DataFrame) -> list[str]:
    """The ids of a manifest without an `id` column: the path, or `path[index]` for tensor rows."""
    paths = column_as_text(table, "path")
    if "index" in table.columns and len(paths) and tensor_row_mask(paths).all():
        keys = column_as_text(table, "key") if "key" in table.columns else None
        try:
            return tensor_row_ids(paths, keys, parse_indices(column_as_text(table, "index"), "(ids)"))
        except ManifestError:
            return paths
    return paths


def _blank(values: list[str]) -> np.ndarray:
    """Which values are empty or whitespace (what `str.strip` leaves empty)."""
    return np.fromiter((not value or value.isspace() for value in values), dtype=bool, count=len(values))


def carriage_return_rows(table: pd.DataFrame) -> np.ndarray:
    """Positions of the rows of which a string value holds a "\r" (looked at row by row only when one does)."""
    if not holds_carriage_return(table):
        return np.zeros(0, dtype=np.int64)
    found = np.zeros(len(table), dtype=bool)
    for column in table.columns:
        found |= table[column].map(lambda value: isinstance(value, str) and "\r" in value).to_numpy(dtype=bool)
    return np.flatnonzero(found)


def holds_carriage_return(table: pd.DataFrame) -> bool:
    """Whether a string value of the table holds a "\r" (`csv_quoting` would quote every field)."""
    for column in table.columns:
        values = table[column].to_numpy()
        if values.dtype == object:
            try:
                if "\r" in "".join(values):  # all strings (CSV, TSV): one scan in C
                    return True
                continue
            except TypeError:  # mixed cells (JSONL): as csv_quoting does
                pass
        if csv_quoting(table[[column]]) == csv.QUOTE_ALL:
            return True
    return False


class ManifestReader:
    """Reads a manifest a block of rows at a time, checking each block and keeping only compact columns."""

    def __init__(self, name: str, require_label: bool):
        self.name, self.require_label = name, require_label
        self.rows = 0
        self.columns: list[str] | None = None
        self.tensors: bool | None = None  # decided by row 1
        self.first_path = ""
        self.paths: TextColumnBuilder | CodedColumnBuilder | None = None
        self.labels = CodedColumnBuilder()
        self.ids = TextColumnBuilder()
        self.keys = CodedColumnBuilder()
        self.indices: list[np.ndarray] = []
        self.hashes: list[np.ndarray] = []  # of the ids (or image paths): for the duplicate check
        self.carriage_rows: list[np.ndarray] = []

    def add(self, chunk: pd.DataFrame) -> None:
        name, start = self.name, self.rows
        if self.columns is None:
            self.columns = list(chunk.columns)
            needed = ["path", "label"] if self.require_label else ["path"]
            missing = [column for column in needed if column not in chunk.columns]
            if missing:
                found = ", ".join(chunk.columns) or "none"
                raise ManifestError(f"manifest {name}: missing column {' and '.join(repr(m) for m in missing)} "
                                    f"(columns found: {found})")
        if len(chunk) == 0:
            return
        paths = column_as_text(chunk, "path")
        labels = column_as_text(chunk, "label") if "label" in chunk.columns else [""] * len(chunk)
        has_id = "id" in chunk.columns
        ids = column_as_text(chunk, "id") if has_id else None
        problems = [(_blank(paths), "an empty path")]
        if self.require_label:
            problems.append((_blank(labels), "an empty label"))
        if has_id:
            problems.append((_blank(ids), "an empty id"))
        bad = np.logical_or.reduce([mask for mask, _ in problems])
        if bad.any():
            at = int(np.argmax(bad))
            what = next(text for mask, text in problems if mask[at])
            raise ManifestError(f"manifest {name}: row {start + at + 1} has {what}")
        is_tensor = tensor_row_mask(paths)
        if self.tensors is None:
            self.tensors, self.first_path = bool(is_tensor[0]), paths[0]
            self.paths = CodedColumnBuilder() if self.tensors else TextColumnBuilder()
        if (is_tensor != self.tensors).any():
            odd = int(np.flatnonzero(is_tensor != self.tensors)[0])
            kinds = ("a tensor file", "an image") if self.tensors else ("an image", "a tensor file")
            raise ManifestError(
                f"manifest {name}: row {start + odd + 1} ({paths[odd]!r}) points at {kinds[1]} but row 1 at "
                f"{kinds[0]}; a manifest lists images or tensor rows (.npy, .safetensors), not both"
            )
        if self.tensors:
            if "index" not in chunk.columns:
                raise ManifestError(
                    f"manifest {name}: rows point into tensor files (row 1: {self.first_path!r}) but there is no "
                    "'index' column naming the row in the file"
                )
            self.indices.append(int32_if_fits(parse_indices(column_as_text(chunk, "index"), name, first_row=start)))
            if "key" in chunk.columns:
                self.keys.add(column_as_text(chunk, "key"))
        self.carriage_rows.append(start + carriage_return_rows(chunk))
        self.paths.add(paths)
        self.labels.add(labels)
        if has_id:
            self.ids.add(ids)
            self.hashes.append(text_hashes(ids))
        elif not self.tensors:
            self.hashes.append(text_hashes(paths))
        self.rows += len(chunk)

    def finish(self, source: TableSource, root: Path) -> Manifest:
        name = self.name
        if self.rows == 0:
            raise ManifestError(f"manifest {name}: has a header but no rows")
        paths, labels = self.paths.build(), self.labels.build()
        tensor_index = tensor_keys = None
        if self.tensors:
            tensor_index = np.concatenate(self.indices)
            if "key" in self.columns:
                tensor_keys = self.keys.build()
                if not any(key.strip() for key in tensor_keys.values):
                    tensor_keys = None
        if "id" in self.columns:
            ids = self.ids.build()
        elif self.tensors:
            ids = TensorRowIds(paths, tensor_keys, tensor_index)  # made when read; never empty: the path is not
        else:
            ids = paths
        if isinstance(ids, TensorRowIds):
            pair = ids.first_duplicate()
        else:
            hashes = np.concatenate(self.hashes)
            self.hashes = []
            pair = first_duplicate(ids, hashes)
        if pair is not None:
            raise ManifestError(f"manifest {name}: duplicate id {ids[pair[1]]!r} in rows {pair[0] + 1} and {pair[1] + 1}")
        return Manifest(source=name, root=root, ids=ids, paths=paths, labels=labels, columns=self.columns,
                        table_source=source, tensor_index=tensor_index, tensor_keys=tensor_keys,
                        carriage_rows=np.concatenate(self.carriage_rows).astype(np.int64))


def read_manifest(path: str | os.PathLike, *, require_label: bool = True) -> Manifest:
    """Read and check a manifest a block of rows at a time (see `Manifest` for what is kept)."""
    source = TableSource(path)
    reader = ManifestReader(str(path), require_label)
    for chunk in source.chunks():
        reader.add(chunk)
    if is_stdio(path):
        root = Path.cwd()
    else:  # an ImageFolder's listing is relative to the folder itself
        root = Path(path).resolve() if os.path.isdir(path) else Path(path).resolve().parent
    return reader.finish(source, root)


def check_inside_root(manifest: Manifest) -> None:
    """Refuse a row whose file resolves (after `..` and symlinks) outside the manifest's folder.

    A manifest handed over by someone else then cannot make irank read, and copy into a review pack,
    files from elsewhere on the machine. realpath(folder/name) is realpath(folder)/name unless `name`
    is itself a symlink, so each folder is resolved once and each file costs one lstat.
    """
    if manifest.holds_tensors:  # one check per file, not per row
        files = [(source.first_row + 1, source.written) for source in manifest.resolved_paths().sources]
    else:
        files = enumerate(manifest.paths, start=1)
    outside = first_outside(manifest.root, files)
    if outside is None:
        return
    sealed = sealed_data_root(manifest)  # a manifest irank wrote elsewhere: inside the data's folder it recorded
    if sealed is not None:
        outside = first_outside(manifest.root, files, within=sealed)
        where = f"the data folder {sealed} its sidecar records"
    else:
        where = f"the manifest's folder {os.path.realpath(manifest.root)}"
    if outside is not None:
        row, written = outside
        raise ManifestError(f"manifest {manifest.source}: row {row}: path {written!r} resolves outside {where}; "
                            "pass --allow-outside-root if you trust this manifest")


def sidecar_of(path: str | os.PathLike) -> dict | None:
    """The JSON object irank wrote beside a table (`NAME.json`), or None (none, unreadable, not an object)."""
    if is_stdio(path) or os.path.isdir(path):
        return None
    try:
        value = parse_json(Path(f"{path}.json").read_bytes().decode("utf-8"), allow_nan=True)
    except (OSError, UnicodeDecodeError, JsonError):
        return None
    return value if isinstance(value, dict) else None


def sealed_data_root(manifest: Manifest) -> str | None:
    """The data folder a manifest's sidecar records under a seal that checks for its bytes (irank wrote it, on
    this account, unchanged since; see irank.formats.seal), else None."""
    sidecar = sidecar_of(manifest.source)
    if sidecar is None or manifest.table_source is None:
        return None
    return sealed_root(sidecar, manifest.table_source.sha256())


def containment_root(manifest: Manifest) -> str:
    """The folder a manifest's rows are to lie in: the data folder it records under a valid seal, else its own."""
    return sealed_data_root(manifest) or os.path.realpath(manifest.root)


def first_outside(root: str | os.PathLike, files: Iterable[tuple[int, str]],
                  within: str | os.PathLike | None = None) -> tuple[int, str] | None:
    """The first (row, path as written) of `files` whose file resolves (after `..` and symlinks) outside the
    folder `within` (default: `root`, against which relative paths resolve); None when every one lies inside."""
    real_root = os.path.realpath(root if within is None else within)
    prefix = real_root.rstrip(os.sep) + os.sep
    real_folders: dict[str, str] = {}
    for row, written in files:
        # no normpath: `link/..` must resolve through the link, as open() does
        joined = written if os.path.isabs(written) else os.path.join(root, written)
        if not _real_path(joined, real_folders).startswith(prefix):
            return row, written
    return None


def _real_path(path: str, real_folders: dict[str, str]) -> str:
    folder, name = os.path.split(path)
    if folder not in real_folders:
        real_folders[folder] = os.path.realpath(folder)
    if name in ("", ".", "..") or os.path.islink(path):
        return os.path.realpath(path)
    return os.path.join(real_folders[folder], name)


def _is_int(text: str) -> bool:
    text = text.strip()
    return text.lstrip("-").isdigit()


def read_classes_file(path: str | os.PathLike) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ManifestError(f"--classes {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"--classes {path}: cannot read: {exc}") from None
    classes = [line.strip() for line in lines if line.strip()]
    if not classes:
        raise ManifestError(f"--classes {path}: no class names in the file")
    if len(set(classes)) != len(classes):
        raise ManifestError(f"--classes {path}: a class name is listed twice")
    return classes


def resolve_classes(
    labels: list[str], *, checkpoint_classes: list[str] | None = None, classes_file: str | None = None
) -> tuple[list[str], str]:
    """The class list and where it came from: checkpoint metadata, else --classes, else the labels."""
    if checkpoint_classes:
        return list(checkpoint_classes), "the checkpoint's metadata"
    if classes_file:
        return read_classes_file(classes_file), f"--classes {classes_file}"
    unique = sorted(distinct(labels))
    if all(_is_int(label) for label in unique):
        top = max(int(label) for label in unique)
        if min(int(label) for label in unique) < 0:
            raise ManifestError("labels are integers but one is negative; class indices start at 0")
        return [str(index) for index in range(top + 1)], "the integer labels (classes 0..max)"
    return unique, "the sorted unique labels of the manifest"


def shown_names(classes: list[str]) -> str:
    """The first class names for a one-line message (a name with a line break or other control character as repr)."""
    return ", ".join(name if name.isprintable() else repr(name) for name in classes[:12]) + (", ..." if len(classes) > 12 else "")


def encode_labels(manifest: Manifest, classes: list[str]) -> np.ndarray:
    """Class index of every row; a label may be a class name or an integer index into `classes`.

    Each distinct label is looked up once."""
    index_of = {name: index for index, name in enumerate(classes)}
    codes, values = codes_and_values(manifest.labels)
    mapped = np.array([index_of[label] if label in index_of
                       else int(label) if _is_int(label) and 0 <= int(label) < len(classes) else -1
                       for label in values], dtype=np.int64)
    encoded = mapped[codes] if len(codes) else np.zeros(0, dtype=np.int64)
    unknown = np.flatnonzero(encoded < 0)
    if len(unknown):
        row = int(unknown[0])
        shown = shown_names(classes)
        raise ManifestError(
            f"manifest {manifest.source}: row {row + 1}: label {manifest.labels[row]!r} is not in the class list ({shown})"
        )
    return encoded


def csv_quoting(table: pd.DataFrame, *texts: list[str]) -> int:
    """Minimal quoting, unless a value holds a lone carriage return: the csv module leaves that unquoted
    and a reader would split the row there, so then every field is quoted. `texts`: more values (lists of
    strings) that go into the same file."""
    if any("\r" in text for values in texts for text in values) or any("\r" in str(name) for name in table.columns):
        return csv.QUOTE_ALL
    for column in table.columns:
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            values = table[column]
            if values.dtype == object:  # mixed cells: only the strings can hold one
                values = values[values.map(lambda value: isinstance(value, str))]
            if values.astype(str).str.contains("\r", regex=False).any():
                return csv.QUOTE_ALL
    return csv.QUOTE_MINIMAL


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table atomically in the format its extension names; '-' writes CSV to stdout."""
    if is_stdio(path):
        sys.stdout.write(table.to_csv(index=False, quoting=csv_quoting(table)))
        sys.stdout.flush()
        return
    fmt = table_format(path)
    with atomic_path(path) as tmp:
        if fmt == "csv":
            table.to_csv(tmp, index=False, quoting=csv_quoting(table))
        elif fmt == "tsv":
            table.to_csv(tmp, index=False, sep="\t", quoting=csv_quoting(table))
        elif fmt == "jsonl":
            tmp.write_text(jsonl_text(table), encoding="utf-8")
        else:
            try:
                table.to_parquet(tmp, index=False)
            except ImportError as exc:
                raise ManifestError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow)") from exc


def _json_value(value):
    """A cell as JSON writes it: numpy values as Python's; a missing or infinite number (NaN, ±inf, pd.NA), which
    JSON cannot hold, as null (as pandas wrote them), inside lists and objects too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple, np.ndarray)):  # a Parquet list column holds arrays
        return [_json_value(item) for item in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _json_other(value) -> str:
    """What JSON has no type for (a Parquet timestamp, bytes): ISO 8601 text, else its text."""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def jsonl_text(block: pd.DataFrame) -> str:
    """The rows of `block` as JSON Lines, one compact object a line (keys in column order), each value as it is:
    a string byte for byte, a float by its shortest repr (pandas' writer kept 10 digits)."""
    names = [str(name) for name in block.columns]
    columns = [[_json_value(value) for value in block.iloc[:, place].tolist()] for place in range(len(names))]
    return "".join(json.dumps(dict(zip(names, values)), ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                              default=_json_other) + "\n" for values in zip(*columns))


def blocks_quoting(blocks, manifest: Manifest, keep: np.ndarray) -> int:
    """`csv_quoting` of the table that `blocks()` yields a block at a time, made of the manifest's rows where
    `keep` holds: minimal unless a kept row held a "\r" (then the blocks are read once to see whether one
    still does)."""
    if any("\r" in str(column) for column in manifest.columns):
        return csv.QUOTE_ALL
    if not keep[manifest.carriage_rows].any():
        return csv.QUOTE_MINIMAL
    return csv.QUOTE_ALL if any(holds_carriage_return(block) for block in blocks()) else csv.QUOTE_MINIMAL


def plain_csv(block: pd.DataFrame, sep: str, header: bool) -> str | None:
    """The block as pandas' `to_csv(index=False, sep=sep)` with minimal quoting writes it, made with str.join:
    at a million rows pandas' writer took 12 of the 14 s `score` spent writing (most of it formatting
    floats). None, to leave the block to pandas, when a name or value would need quoting or a column is
    not of a plain type (integers, booleans, float64, strings)."""
    specials = (sep, '"', "\n", "\r")

    def plain(texts: list[str]) -> bool:
        joined = "\x00".join(texts)
        return not any(special in joined for special in specials)

    names = [str(name) for name in block.columns]
    if len(names) < 2 or not plain(names):  # a lone empty field is written quoted
        return None
    columns = []
    for place in range(len(names)):
        values = block.iloc[:, place].to_numpy()
        if values.dtype.kind in "iu":
            texts = list(map(str, values.tolist()))
        elif values.dtype.kind == "b":
            texts = ["True" if value else "False" for value in values.tolist()]
        elif values.dtype == np.float64:
            texts = list(map(repr, values.tolist()))  # the shortest repr, as numpy's str and pandas write it
            for row in np.flatnonzero(np.isnan(values)).tolist():
                texts[row] = ""
        elif values.dtype == object:
            texts = values.tolist()
            if pd.api.types.infer_dtype(texts, skipna=False) not in ("string", "empty") or not plain(texts):
                return None
        else:
            return None
        columns.append(texts)
    lines = [sep.join(names)] if header else []
    lines.extend(map(sep.join, zip(*columns)))
    return "\n".join(lines) + "\n" if lines else ""


def write_blocks(blocks: Iterable[pd.DataFrame], path: str | os.PathLike, quoting: int = csv.QUOTE_MINIMAL) -> None:
    """Write a table given as consecutive blocks of rows (the first one carries the header), atomically, as
    `write_table` does, holding one block at a time: CSV, TSV, JSONL and stdout are appended to block by
    block; Parquet, whose writer here takes a whole table, is assembled first. `quoting`: `csv_quoting` of
    the whole table, which one block cannot know (the caller can)."""
    def csv_text(block: pd.DataFrame, header: bool, sep: str) -> str:
        text = plain_csv(block, sep, header) if quoting == csv.QUOTE_MINIMAL else None
        return text if text is not None else block.to_csv(index=False, header=header, sep=sep, quoting=quoting)

    if is_stdio(path):
        for number, block in enumerate(blocks):
            sys.stdout.write(csv_text(block, number == 0, ","))
        sys.stdout.flush()
        return
    fmt = table_format(path)
    if fmt == "parquet":
        write_table(pd.concat(list(blocks), ignore_index=True), path)
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        for number, block in enumerate(blocks):
            if fmt == "jsonl":
                handle.write(jsonl_text(block))
            else:
                handle.write(csv_text(block, number == 0, "\t" if fmt == "tsv" else ","))


def manifest_sha256(path: str | os.PathLike) -> str:
    """The sha256 a command records of a manifest: of its file, or of an ImageFolder's listing as irank reads it."""
    return TableSource(path).sha256() if os.path.isdir(path) else sha256_file(path)


def folder_table(image_dir: str | os.PathLike) -> pd.DataFrame:
    """An ImageFolder given where a manifest goes: its images (`class/xxx.jpg`), paths relative to the folder."""
    return manifest_from_folder(image_dir, Path(image_dir).resolve() / "manifest.csv")


def manifest_from_folder(image_dir: str | os.PathLike, output: str | os.PathLike) -> pd.DataFrame:
    """An ImageFolder tree (`class/xxx.jpg`) as a manifest table, paths relative to the output's folder."""
    root = Path(image_dir)
    if not root.is_dir():
        raise ManifestError(f"{image_dir}: not a folder")
    out_dir = Path(output).resolve().parent if not is_stdio(output) else Path.cwd()
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(class_dir.rglob("*")):
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                absolute = image.resolve()
                try:
                    shown = os.path.relpath(absolute, out_dir)
                except ValueError:
                    shown = str(absolute)
                rows.append({"path": Path(shown).as_posix(), "label": class_dir.name})
    if not rows:
        raise ManifestError(f"{image_dir}: no images found in class sub-folders (expected {image_dir}/<class>/<image>)")
    return pd.DataFrame(rows, columns=["path", "label"])


def path_rebaser(paths: Iterable[str], source_root: Path, output: str | os.PathLike):
    """A function that rewrites a block of a manifest's rows so that relative paths resolve from the output's
    folder, or None when no path changes (the same folder; only absolute paths).

    A manifest written to another folder keeps pointing at the same files. When paths change and the
    table has no `id` column, one is added holding the original paths (`default_ids`), so ids stay stable.
    `paths`: every path of the table (looked at until the first that changes)."""
    target_root = Path.cwd() if is_stdio(output) else Path(output).resolve().parent
    if target_root == source_root.resolve():
        return None

    def rebased(value: str) -> str:
        if os.path.isabs(value):
            return value
        absolute = os.path.normpath(source_root / value)
        try:
            return Path(os.path.relpath(absolute, target_root)).as_posix()
        except ValueError:
            return absolute

    if all(rebased(value) == value for value in paths):
        return None

    def rebase(table: pd.DataFrame) -> pd.DataFrame:
        memo: dict[str, str] = {}
        written = column_as_text(table, "path")
        table = table.copy()
        if "id" not in table.columns:
            table.insert(0, "id", default_ids(table))
        table["path"] = [memo[value] if value in memo else memo.setdefault(value, rebased(value)) for value in written]
        return table

    return rebase


def rebase_paths(table: pd.DataFrame, source_root: Path, output: str | os.PathLike) -> pd.DataFrame:
    """The table with relative paths rewritten to resolve from the output's folder (see `path_rebaser`)."""
    rebase = path_rebaser(column_as_text(table, "path"), source_root, output)
    return table if rebase is None else rebase(table)
