"""Manifests: read, validate and write the tables that list a data set's samples.

A manifest has one row per sample with a `path` (relative to the manifest's folder, or absolute)
and a `label` (a class name or an integer index), and optionally an `id` (default: the path).
Rows are all images, or all tensor rows: `path` a `.npy` or `.safetensors` file, an `index` column
the row in it, an optional `key` column the tensor's name (default id: `path[index]`).
Every other column is the user's and is carried through every stage untouched.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from .errors import ManifestError
from .files import atomic_path, is_stdio
from .tensors import TensorRowIds, TensorRows, parse_indices, tensor_row_ids, tensor_row_mask

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


def read_table(path: str | os.PathLike, *, what: str = "manifest", columns: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet table (or CSV from stdin for '-'), values kept as the user wrote them.

    With `columns`, only those of them the table has are kept (CSV/TSV: the others are never parsed).
    """
    fmt = table_format(path)
    source = sys.stdin.buffer if is_stdio(path) else path
    if not is_stdio(path):
        if not Path(path).exists():
            raise ManifestError(f"{what} {path}: no such file")
        if Path(path).is_dir():
            raise ManifestError(f"{what} {path}: is a folder, not a file")
    try:
        if fmt in ("csv", "tsv"):
            if is_stdio(path):
                source = io.BytesIO(sys.stdin.buffer.read())
            table = pd.read_csv(
                source,
                sep="\t" if fmt == "tsv" else ",",
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                usecols=None if columns is None else (lambda column: column in columns),
            )
        elif fmt == "jsonl":
            table = pd.read_json(source, lines=True, dtype=False)
        else:
            try:
                table = pd.read_parquet(source)
            except ImportError as exc:
                raise ManifestError(f"{what} {path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
    except ManifestError:
        raise
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{what} {path}: the file is empty") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{what} {path}: not valid UTF-8 text (byte {exc.start})") from None
    except (pd.errors.ParserError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(f"{what} {path}: cannot parse as {fmt}: {first_line}") from None
    except OSError as exc:
        raise ManifestError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    table.columns = [str(column) for column in table.columns]
    if columns is not None:
        table = table[[column for column in table.columns if column in columns]]
    return table


def column_as_text(table: pd.DataFrame, column: str) -> list[str]:
    """A column's values as strings, as the user wrote them (JSON numbers without a trailing .0)."""
    values = []
    for value in table[column].tolist():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        values.append("" if value is None else str(value))
    return values


class ImagePaths(Sequence):
    """The image rows' files, each resolved against the manifest's folder when it is read: a list of a
    million Path objects would hold 283 MB (traced), these hold nothing but the paths as written."""

    def __init__(self, root: Path, written: list[str]):
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
    """A validated manifest: the user's table plus the columns irank reads from it."""

    table: pd.DataFrame
    source: str
    root: Path
    ids: "list[str] | TensorRowIds"
    paths: list[str]
    labels: list[str]
    tensor_index: np.ndarray | None = None  # tensor rows: the `index` column as int64; None for images
    tensor_keys: list[str] | None = None  # tensor rows with a `key` column: its values ("" = the only tensor)
    _resolved: "ImagePaths | TensorRows | None" = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def holds_tensors(self) -> bool:
        return self.tensor_index is not None

    def subset(self, rows: list[int]) -> "Manifest":
        """The same manifest with only `rows` (0-based), in their order."""
        return Manifest(table=self.table.iloc[rows].reset_index(drop=True), source=self.source, root=self.root,
                        ids=[self.ids[r] for r in rows], paths=[self.paths[r] for r in rows],
                        labels=[self.labels[r] for r in rows],
                        tensor_index=None if self.tensor_index is None else self.tensor_index[np.asarray(rows, dtype=np.int64)],
                        tensor_keys=None if self.tensor_keys is None else [self.tensor_keys[r] for r in rows])

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


def tensor_columns(table: pd.DataFrame, paths: list[str], name: str) -> tuple[np.ndarray | None, list[str] | None]:
    """For a manifest of tensor rows, its `index` (int64) and `key` values; (None, None) for images.

    A manifest mixing image rows and tensor rows is refused, naming the first row of the other kind.
    """
    is_tensor = tensor_row_mask(paths)
    if not is_tensor.any():
        return None, None
    if not is_tensor.all():
        odd = int(np.flatnonzero(is_tensor != is_tensor[0])[0])
        kinds = ("a tensor file", "an image") if is_tensor[0] else ("an image", "a tensor file")
        raise ManifestError(
            f"manifest {name}: row {odd + 1} ({paths[odd]!r}) points at {kinds[1]} but row 1 at {kinds[0]}; "
            "a manifest lists images or tensor rows (.npy, .safetensors), not both"
        )
    if "index" not in table.columns:
        raise ManifestError(
            f"manifest {name}: rows point into tensor files (row 1: {paths[0]!r}) but there is no 'index' column "
            "naming the row in the file"
        )
    keys = column_as_text(table, "key") if "key" in table.columns else None
    if keys is not None and not any(key.strip() for key in keys):
        keys = None
    return parse_indices(column_as_text(table, "index"), name), keys


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


def read_manifest(path: str | os.PathLike, *, require_label: bool = True) -> Manifest:
    table = read_table(path)
    name = str(path)
    needed = ["path", "label"] if require_label else ["path"]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        found = ", ".join(table.columns) or "none"
        raise ManifestError(f"manifest {name}: missing column {' and '.join(repr(m) for m in missing)} (columns found: {found})")
    if len(table) == 0:
        raise ManifestError(f"manifest {name}: has a header but no rows")
    paths = column_as_text(table, "path")
    labels = column_as_text(table, "label") if "label" in table.columns else [""] * len(table)
    tensor_index, tensor_keys = tensor_columns(table, paths, name)
    if "id" in table.columns:
        ids = column_as_text(table, "id")
    elif tensor_index is not None:
        ids = TensorRowIds(paths, tensor_keys, tensor_index)  # made when read; never empty: the path is not
    else:
        ids = list(paths)
    made = isinstance(ids, TensorRowIds)
    for row, (sample_path, label, sample_id) in enumerate(zip(paths, labels, paths if made else ids), start=1):
        if not sample_path.strip():
            raise ManifestError(f"manifest {name}: row {row} has an empty path")
        if require_label and not label.strip():
            raise ManifestError(f"manifest {name}: row {row} has an empty label")
        if not sample_id.strip():
            raise ManifestError(f"manifest {name}: row {row} has an empty id")
    if made:
        pair = ids.first_duplicate()
        if pair is not None:
            raise ManifestError(f"manifest {name}: duplicate id {ids[pair[1]]!r} in rows {pair[0] + 1} and {pair[1] + 1}")
    else:
        first_row: dict[str, int] = {}
        for row, sample_id in enumerate(ids, start=1):
            if sample_id in first_row:
                raise ManifestError(
                    f"manifest {name}: duplicate id {sample_id!r} in rows {first_row[sample_id]} and {row}"
                )
            first_row[sample_id] = row
    root = Path.cwd() if is_stdio(path) else Path(path).resolve().parent
    return Manifest(table=table, source=name, root=root, ids=ids, paths=paths, labels=labels,
                    tensor_index=tensor_index, tensor_keys=tensor_keys)


def check_inside_root(manifest: Manifest) -> None:
    """Refuse a row whose file resolves (after `..` and symlinks) outside the manifest's folder.

    A manifest handed over by someone else then cannot make irank read, and copy into a review pack,
    files from elsewhere on the machine. realpath(folder/name) is realpath(folder)/name unless `name`
    is itself a symlink, so each folder is resolved once and each file costs one lstat.
    """
    root = os.path.realpath(manifest.root)
    prefix = root.rstrip(os.sep) + os.sep
    real_folders: dict[str, str] = {}
    if manifest.holds_tensors:  # one check per file, not per row
        files = [(source.first_row + 1, source.written) for source in manifest.resolved_paths().sources]
    else:
        files = list(enumerate(manifest.paths, start=1))
    for row, written in files:
        # no normpath: `link/..` must resolve through the link, as open() does
        joined = written if os.path.isabs(written) else os.path.join(manifest.root, written)
        real = _real_path(joined, real_folders)
        if not real.startswith(prefix):
            raise ManifestError(
                f"manifest {manifest.source}: row {row}: path {written!r} resolves outside the manifest's folder "
                f"{root}; pass --allow-outside-root if you trust this manifest"
            )


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
    unique = sorted(set(labels))
    if all(_is_int(label) for label in unique):
        top = max(int(label) for label in unique)
        if min(int(label) for label in unique) < 0:
            raise ManifestError("labels are integers but one is negative; class indices start at 0")
        return [str(index) for index in range(top + 1)], "the integer labels (classes 0..max)"
    return unique, "the sorted unique labels of the manifest"


def encode_labels(manifest: Manifest, classes: list[str]) -> np.ndarray:
    """Class index of every row; a label may be a class name or an integer index into `classes`."""
    index_of = {name: index for index, name in enumerate(classes)}
    encoded = np.empty(len(manifest), dtype=np.int64)
    for row, label in enumerate(manifest.labels):
        if label in index_of:
            encoded[row] = index_of[label]
        elif _is_int(label) and 0 <= int(label) < len(classes):
            encoded[row] = int(label)
        else:
            shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
            raise ManifestError(
                f"manifest {manifest.source}: row {row + 1}: label {label!r} is not in the class list ({shown})"
            )
    return encoded


def csv_quoting(table: pd.DataFrame, *texts: list[str]) -> int:
    """Minimal quoting, unless a value holds a lone carriage return: the csv module leaves that unquoted
    and a reader would split the row there, so then every field is quoted. `texts`: more values (lists of
    strings) that go into the same file."""
    if any("\r" in text for values in texts for text in values):
        return csv.QUOTE_ALL
    for column in table.columns:
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            values = table[column]
            if values.dtype == object:  # mixed cells: only the strings can hold one
                values = values[values.map(type) == str]
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
            table.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            try:
                table.to_parquet(tmp, index=False)
            except ImportError as exc:
                raise ManifestError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow)") from exc


def write_blocks(blocks: Iterable[pd.DataFrame], path: str | os.PathLike, quoting: int = csv.QUOTE_MINIMAL) -> None:
    """Write a table given as consecutive blocks of rows (the first one carries the header), atomically, as
    `write_table` does, holding one block at a time: CSV, TSV, JSONL and stdout are appended to block by
    block; Parquet, whose writer here takes a whole table, is assembled first. `quoting`: `csv_quoting` of
    the whole table, which one block cannot know (the caller can)."""
    if is_stdio(path):
        for number, block in enumerate(blocks):
            sys.stdout.write(block.to_csv(index=False, header=number == 0, quoting=quoting))
        sys.stdout.flush()
        return
    fmt = table_format(path)
    if fmt == "parquet":
        write_table(pd.concat(list(blocks), ignore_index=True), path)
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        for number, block in enumerate(blocks):
            if fmt == "jsonl":
                if len(block):
                    text = block.to_json(orient="records", lines=True, force_ascii=False)
                    handle.write(text if text.endswith("\n") else text + "\n")
            else:
                block.to_csv(handle, index=False, header=number == 0, sep="\t" if fmt == "tsv" else ",",
                             quoting=quoting)


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


def rebase_paths(table: pd.DataFrame, source_root: Path, output: str | os.PathLike) -> pd.DataFrame:
    """The table with relative paths rewritten to resolve from the output's folder.

    A manifest written to another folder keeps pointing at the same files. When paths change and
    the table has no `id` column, one is added holding the original paths, so ids stay stable.
    """
    target_root = Path.cwd() if is_stdio(output) else Path(output).resolve().parent
    if target_root == source_root.resolve():
        return table
    original = column_as_text(table, "path")
    rebased = []
    for value in original:
        if os.path.isabs(value):
            rebased.append(value)
        else:
            absolute = os.path.normpath(source_root / value)
            try:
                rebased.append(Path(os.path.relpath(absolute, target_root)).as_posix())
            except ValueError:
                rebased.append(absolute)
    if rebased == original:
        return table
    table = table.copy()
    if "id" not in table.columns:
        table.insert(0, "id", default_ids(table))
    table["path"] = rebased
    return table
