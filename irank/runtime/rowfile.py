"""Rows of a `.npy` array or a `.safetensors` tensor, read straight from the file with positioned reads.

A memory-mapped file makes every page it touches count as this process's resident memory until the
pages are released, and a kernel that keeps a file's page cache in large folios maps a whole folio on a
fault: a batch of 1,024 rows scattered over a 1.28 GB `.npy` (`--layer auto`'s choice sample) mapped
254 MB, and a `.safetensors` file, read through the safetensors library's own mapping, stayed mapped
as it was read. `RowFile` reads each run of consecutive rows with one `os.preadv` into the batch's own
buffer: only the rows' bytes, nothing mapped.

A `.npy` file in Fortran order (its rows are not contiguous) or with a header version other than 1.0 or
2.0 has `layout_of` answer None; the caller reads those through a memory map.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
    "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the format's own limit


@dataclass(frozen=True)
class RowLayout:
    """Where a file's rows lie: `length` rows of `row_bytes` bytes each from byte `offset`, each row
    `row_shape` values of `dtype` (a numpy dtype for .npy, a torch dtype for .safetensors)."""

    offset: int
    length: int
    row_shape: tuple[int, ...]
    dtype: np.dtype | torch.dtype

    @property
    def row_bytes(self) -> int:
        itemsize = self.dtype.itemsize
        return int(np.prod(self.row_shape, dtype=np.int64)) * itemsize


def npy_header(file: Path) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, Fortran order, dtype, where the data starts) of a .npy file, None for a header version read only
    by np.load; ValueError, saying why, when it is not a .npy file or its header cannot be read."""
    with open(file, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
        except ValueError:
            raise ValueError("not a .npy file (it does not start with NumPy's header)") from None
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return None
        try:
            shape, fortran_order, dtype = readers[version](handle)
        except ValueError as exc:
            raise ValueError(f"not a readable .npy file ({str(exc).splitlines()[0] if str(exc) else 'bad header'})") from None
        return tuple(shape), bool(fortran_order), np.dtype(dtype), handle.tell()


def npy_layout(file: Path) -> RowLayout | None:
    """The rows of a C-ordered .npy array (None for Fortran order or a header np.load alone reads)."""
    header = npy_header(file)
    if header is None:
        return None
    shape, fortran_order, dtype, offset = header
    if fortran_order and len(shape) > 1:
        return None
    if len(shape) == 0:
        raise ValueError("holds a single number; expected one row per sample along the first axis")
    return RowLayout(offset, int(shape[0]), tuple(int(size) for size in shape[1:]), dtype)


def safetensors_layout(file: Path, key: str | None) -> RowLayout:
    """The rows of the tensor `key` (or the file's only tensor) of a .safetensors file, from its header:
    an 8-byte little-endian length, then that many bytes of JSON giving each tensor's dtype, shape and
    byte range after the header."""
    with open(file, "rb") as handle:
        start = handle.read(8)
        if len(start) != 8:
            raise ValueError("not a .safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", start)
        if size > MAX_SAFETENSORS_HEADER:
            raise ValueError("not a .safetensors file (its header length is implausible)")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not a .safetensors file (its header is not JSON)") from None
    names = [name for name in header if name != "__metadata__"]
    if key is None:
        if len(names) != 1:
            raise ValueError(f"holds {len(names)} tensors; name one in a 'key' column")
        key = names[0]
    entry = header.get(key)
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        raise ValueError(f"no numeric tensor named {key!r}")
    shape = [int(size) for size in entry["shape"]]
    begin, _ = entry["data_offsets"]
    if not shape:
        raise ValueError("holds a single number; expected one row per sample along the first axis")
    return RowLayout(8 + size + int(begin), shape[0], tuple(shape[1:]), SAFETENSORS_DTYPES[entry["dtype"]])


def layout_of(file: Path, key: str | None) -> RowLayout | None:
    """`npy_layout` or `safetensors_layout` by the file's suffix."""
    return npy_layout(file) if file.name.lower().endswith(".npy") else safetensors_layout(file, key)


def move_all(call, handle: int, buffer: memoryview, offset: int, ended: str) -> None:
    """`os.preadv` or `os.pwritev` of the whole `buffer` at `offset`, again while the system moves less per call;
    OSError `ended` (with how far it got) when a call moves nothing."""
    done = 0
    while done < len(buffer):
        moved = call(handle, [buffer[done:]], offset + done)
        if moved <= 0:
            raise OSError(f"{ended} ({done} of {len(buffer)} bytes)")
        done += moved


def runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, end) positions in `rows` of each run of consecutive row numbers (rows[i + 1] == rows[i] + 1)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    firsts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
    return firsts, np.append(firsts[1:], len(rows))


class RowFile:
    """An open tensor file whose rows are read by `read` (float32, in the order asked)."""

    def __init__(self, file: Path, layout: RowLayout):
        self.file, self.layout, self.handle = file, layout, None
        self.handle = os.open(file, os.O_RDONLY)

    def close(self) -> None:
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None

    def __del__(self):
        self.close()

    def read(self, indices: np.ndarray) -> torch.Tensor:
        """Rows `indices` (any order, repeats allowed) as float32, shaped (len(indices), *row_shape)."""
        indices = np.asarray(indices, dtype=np.int64)
        layout = self.layout
        rows, inverse = np.unique(indices, return_inverse=True)
        if len(rows) and (rows[0] < 0 or rows[-1] >= layout.length):
            bad = rows[0] if rows[0] < 0 else rows[-1]
            raise IndexError(f"index {bad} is out of range ({layout.length} rows)")
        width = layout.row_bytes
        buffer = np.empty(len(rows) * width, dtype=np.uint8)
        view = memoryview(buffer)
        for first, end in zip(*(part.tolist() for part in runs(rows))):
            move_all(os.preadv, self.handle, view[first * width:end * width], layout.offset + int(rows[first]) * width,
                     f"{self.file}: the file ends before the rows its header lists")
        values = self._decode(buffer, len(rows))
        if len(rows) != len(indices) or not np.array_equal(rows, indices):
            values = values[torch.from_numpy(inverse.reshape(-1))]
        return values

    def _decode(self, buffer: np.ndarray, count: int) -> torch.Tensor:
        shape = (count, *self.layout.row_shape)
        if count == 0:
            return torch.zeros(shape, dtype=torch.float32)
        if isinstance(self.layout.dtype, torch.dtype):
            return torch.from_numpy(buffer).view(self.layout.dtype).reshape(shape).to(torch.float32)
        values = buffer.view(self.layout.dtype).reshape(shape)
        return torch.from_numpy(np.asarray(values, dtype=np.float32))
