"""What the math needs from the runtime, as protocols: the runtime's objects fit them, so the core imports none of it.

- `Shard`: this process's rows of a data set split over processes (torchrun), and the collectives the fits and
  curvatures use over them (`irank.runtime.distributed.Shard` is one).
- `Budget`: where a per-row array of a given size is kept (in memory, or a temporary file past a limit:
  `irank.runtime.memory.MemoryBudget` is one); `IN_MEMORY` keeps everything in memory.
- `Log`: where the math says what it chose (a reporter's `info`, `print`, or nothing).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

Log = Callable[[str], None]


def silent(message: str) -> None:
    """A Log that says nothing."""


class Shard(Protocol):
    """This process's rows out of `total` over every process, and sums and gathers over all of them."""

    total: int
    start: int | None  # the first row of this process's contiguous block (None for a subset of rows)

    @property
    def leads(self) -> bool:
        """Whether this process decides where every process must agree (rank 0)."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process."""

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over every process's rows of `values` (this process's rows)."""

    def gram(self, left: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
        """The mean over every row of left_i right_iᵀ."""

    def part(self, keep: torch.Tensor) -> "Shard":
        """The shard of the rows `keep` selects, out of every process's so selected."""

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's rows of `values`, in order."""

    def gather_into(self, values, out):
        """`gather` into a preallocated `out`."""

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrite `tensor` on every process with the leading process's."""


class Budget(Protocol):
    def array(self, rows: int, width: int, dtype: torch.dtype = torch.float32):
        """An uninitialized (rows, width) array that indexes like a tensor (in memory, or on disk)."""


class _InMemory:
    def array(self, rows: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(rows, width, dtype=dtype)


IN_MEMORY: Budget = _InMemory()
