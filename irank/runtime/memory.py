"""Per-sample arrays that may outgrow memory: the head inputs, logits or a layer's features of every row.

`score` keeps (rows × width) arrays of such state between its forward pass and its math (float32; the
probe's logits float64).
A `MemoryBudget` hands out in-memory tensors while they fit in it and, past it, `DiskRows`: the same
array in an anonymous temporary file (removed by the system when the process ends, even on a crash),
read and written a block of rows at a time with pread/pwrite. Nothing is memory-mapped, so the
resident memory of a disk-backed array is the block in hand, whatever the number of rows; the file's
pages sit in the kernel's page cache, which the kernel can drop.

The math reads these arrays only through `len`, `.shape`, `.dtype` and row slices `[start:end]`, and the
forward pass writes them only through `index_copy_(0, rows, values)`, so a `DiskRows` stands in for a tensor.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from irank.runtime.rowfile import move_all, runs

NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


ENDED_EARLY = "the temporary file of per-sample values ended early"


class DiskRows:
    """A (rows × width) float32 (or float64) array in a temporary file; row slices read into fresh tensors."""

    def __init__(self, rows: int, width: int, folder: str | None = None, dtype: torch.dtype = torch.float32):
        self.shape = torch.Size((rows, width))
        self.dtype = dtype
        self._numpy_dtype = NUMPY_DTYPES[dtype]
        self._row_bytes = width * np.dtype(self._numpy_dtype).itemsize
        self._file = tempfile.TemporaryFile(prefix="irank-rows-", dir=folder)
        self._file.truncate(rows * self._row_bytes)  # sparse: zeros until written

    def __len__(self) -> int:
        return self.shape[0]

    def is_floating_point(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()

    def __getitem__(self, key) -> torch.Tensor:
        if not isinstance(key, slice):
            raise TypeError("DiskRows reads row slices [start:end] only")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise TypeError("DiskRows reads contiguous row slices only")
        block = np.empty((max(0, stop - start), self.shape[1]), dtype=self._numpy_dtype)
        if block.size:
            move_all(os.preadv, self._file.fileno(), memoryview(block.reshape(-1)).cast("B"), start * self._row_bytes,
                     ENDED_EARLY)
        return torch.from_numpy(block)

    def index_copy_(self, dim: int, index: torch.Tensor, values: torch.Tensor) -> "DiskRows":
        """Write values[i] to row index[i], one pwrite per run of consecutive rows."""
        if dim != 0:
            raise TypeError("DiskRows writes whole rows (dim 0) only")
        rows = index.cpu().numpy().astype(np.int64, copy=False)
        if len(rows) == 0:
            return self
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row {int(rows.max() if rows.max() >= len(self) else rows.min())} outside 0..{len(self) - 1}")
        data = np.ascontiguousarray(values.detach().cpu().numpy(), dtype=self._numpy_dtype).reshape(len(rows), -1)
        for first, last in zip(*(part.tolist() for part in runs(rows))):
            move_all(os.pwritev, self._file.fileno(), memoryview(data[first:last].reshape(-1)).cast("B"),
                     int(rows[first]) * self._row_bytes, ENDED_EARLY)
        return self


class MemoryBudget:
    """Hands out per-sample arrays (float32 unless asked): in memory while they fit in what is left of
    `limit` bytes, on disk (`DiskRows`) after that. `limit` None: always in memory."""

    def __init__(self, limit: int | None = None, folder: str | None = None):
        self.limit = limit
        self.left = limit
        self.folder = folder
        self.spilled = 0  # bytes given out on disk

    def array(self, rows: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | DiskRows:
        size = rows * width * torch.empty((), dtype=dtype).element_size()
        if self.left is None or size <= self.left:
            if self.left is not None:
                self.left -= size
            return torch.empty(rows, width, dtype=dtype)
        self.spilled += size
        return DiskRows(rows, width, self.folder, dtype)
