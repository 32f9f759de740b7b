"""Many processes under torchrun: which rows this process holds, and the collectives that make a
sharded run compute what one process computes.

`torchrun --nproc-per-node N -m irank ...` sets WORLD_SIZE, RANK and LOCAL_RANK; the CLI then joins the
process group (gloo for CPU tensors, nccl for CUDA ones, each process on cuda:LOCAL_RANK). Every process
reads a contiguous block of the manifest's rows (a `Shard`); sums over samples are all-reduced and
per-row results are gathered back in manifest order. Only rank 0 prints and writes files.

A user error seen by one process must not leave the others waiting in a collective: per-process work
that can fail runs inside `all_or_none()`, which tells every process whether any of them failed before
the next collective; the first failing rank reports its message, the others exit with its code silently.

With one process (plain `irank`, or WORLD_SIZE=1) nothing here does anything: `shard_of` is None,
`all_or_none` only yields, and the library takes its single-process code paths unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from irank.runtime.errors import IrankError, PeerFailed
from irank.runtime.launch import launched_by_torchrun

# A process other than rank 0 writes files only inside `local_outputs()` (post-train's private folder).
_writes_locally = contextvars.ContextVar("irank_writes_locally", default=False)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def writes_here() -> bool:
    """Whether this process writes the files a command names: rank 0 only (or anyone inside `local_outputs`)."""
    return is_main() or _writes_locally.get()


@contextlib.contextmanager
def local_outputs() -> Iterator[None]:
    """Let this process write files although it is not rank 0 (to a private folder the caller chose)."""
    token = _writes_locally.set(True)
    try:
        yield
    finally:
        _writes_locally.reset(token)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join torchrun's process group for the duration; a no-op for a single process or one already joined."""
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        yield
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # one GPU per process; "cuda" then means this one
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp_device_ids() -> list[int] | None:
    """DistributedDataParallel's device_ids for a model on `device`: this process's GPU, or None on CPU."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------- rows


def block(total: int, index: int, parts: int) -> tuple[int, int]:
    """[start, stop) of the `index`-th of `parts` contiguous blocks of `total` rows (sizes differ by ≤ 1)."""
    return total * index // parts, total * (index + 1) // parts


@dataclass(frozen=True)
class Shard:
    """The rows of a data set this process holds, out of `total` over all processes.

    `start` is the global index of the first local row for a contiguous block (None for a subset of
    one, such as the training folds of a cross-validation). Every method is a collective: all
    processes call it in the same order.
    """

    local: int
    total: int
    start: int | None = None

    @property
    def stop(self) -> int:
        assert self.start is not None
        return self.start + self.local

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all processes (a new tensor; the input is left alone)."""
        return all_reduce_sum(tensor)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over all rows of every process, of per-row `values` (dim 0 is the row)."""
        return self.sum(values.sum(0)) / self.total

    def gram(self, left: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
        """mean over all rows of left_i right_iᵀ: leftᵀ right / total, summed over processes."""
        right = left if right is None else right
        return self.sum(left.T @ right) / self.total

    def part(self, keep: torch.Tensor) -> "Shard":
        """The shard of the rows where the boolean mask `keep` (over the local rows) is true."""
        local = int(keep.sum())
        return Shard(local=local, total=int(self.sum(torch.tensor([local], dtype=torch.int64))[0]))

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row `values` of every process, concatenated in row order, on every process."""
        return gather_rows(values, self.total)

    def gather_into(self, values, out):
        """`gather` written into `out` (every row's array: a tensor, or a `DiskRows`), a chunk of rows at a time."""
        return gather_rows_into(values, self.total, out)

    @property
    def leads(self) -> bool:
        """Whether this process is rank 0, which decides where every process must agree."""
        return is_main()

    def broadcast_(self, tensor: torch.Tensor) -> None:
        """Overwrite `tensor` on every process with rank 0's."""
        broadcast_(tensor)


def shard_of(total: int) -> Shard | None:
    """This process's contiguous block of `total` rows under torchrun; None with one process."""
    if not active():
        return None
    start, stop = block(total, rank(), world_size())
    return Shard(local=stop - start, total=total, start=start)


def local_rows(values, shard: Shard | None):
    """The rows of a full-length array or tensor that this process holds."""
    return values if shard is None else values[shard.start : shard.stop]


# ----------------------------------------------------------------------------------------- collectives


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    result = tensor.detach().clone()
    if active():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def broadcast_(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Overwrite `tensor` (in place) with rank `source`'s values; returns it."""
    if active():
        dist.broadcast(tensor, src=source)
    return tensor


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank `source`'s `value` (picklable), on every process."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


def gather_objects(value: Any) -> list:
    """Every process's picklable `value` (small: e.g. a sample's features), in rank order, on every process."""
    if not active():
        return [value]
    received: list = [None] * world_size()
    dist.all_gather_object(received, value)
    return received


def gather_rows(values: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate the contiguous blocks of every process (as `block` splits `total`) in row order."""
    if not active():
        return values
    parts = world_size()
    sizes = [stop - start for start, stop in (block(total, index, parts) for index in range(parts))]
    padded = torch.zeros((max(sizes), *values.shape[1:]), dtype=values.dtype)
    padded[: len(values)] = values.detach().cpu()
    received = [torch.empty_like(padded) for _ in range(parts)]
    dist.all_gather(received, padded)
    return torch.cat([part[:size] for part, size in zip(received, sizes)])


GATHER_ROWS = 65_536  # rows broadcast at a time by `gather_rows_into`


def gather_rows_into(values, total: int, out, chunk_rows: int = GATHER_ROWS):
    """Every process's contiguous block of `values` (a tensor, or a `DiskRows`) written into `out` (all `total`
    rows: a tensor, or a `DiskRows`), on every process; returns `out`. Each process broadcasts its block a chunk
    of rows at a time, so besides `out` a process holds one chunk: `gather_rows`' all_gather holds every
    process's block twice over (at ten million rows of 8 float64 columns, 1.3 GB per process beside the result)."""
    if not active():
        out.index_copy_(0, torch.arange(len(values)), values[0:len(values)])
        return out
    me, parts = rank(), world_size()
    for index in range(parts):
        start, stop = block(total, index, parts)
        for first in range(start, stop, chunk_rows):
            last = min(first + chunk_rows, stop)
            if index == me:
                chunk = values[first - start:last - start].detach().cpu().to(out.dtype).contiguous()
            else:
                chunk = torch.empty((last - first, *out.shape[1:]), dtype=out.dtype)
            dist.broadcast(chunk, src=index)
            out.index_copy_(0, torch.arange(first, last), chunk)
    return out


def settle() -> None:
    """Wait, on the way out, until every process is here. After a failure: torchrun ends the others as soon
    as one exits non-zero, which must not cut short the message the failing process prints. After success:
    no process leaves the group while another is still exchanging with it."""
    if not active():
        return
    for stream in (sys.stdout, sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # a peer that died already: nothing left to wait for
        dist.barrier()


# ------------------------------------------------------------------------------------------- failures


def _exit_code(error: BaseException) -> int:
    if isinstance(error, IrankError):
        return error.exit_code
    if isinstance(error, OSError):
        return 3  # the CLI's code for a file that cannot be read or written
    return 1


def _agree(error: BaseException | None) -> None:
    """Tell every process whether any failed; re-raise on the first failing rank, PeerFailed elsewhere."""
    outcomes: list[int | None] = [None] * world_size()
    dist.all_gather_object(outcomes, None if error is None else _exit_code(error))
    failed = [index for index, code in enumerate(outcomes) if code is not None]
    if not failed:
        return
    first = failed[0]
    if first == rank():
        assert error is not None
        error.irank_reported_by_rank = first  # the CLI prints it here, whichever rank this is
        raise error
    raise PeerFailed(first, outcomes[first])


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Run per-process work that may fail (reading inputs, images, writing files) so that every process
    learns of a failure on any of them before the next collective, and all stop together.

    The body must hold no collective: a process that fails before it would wait for the others at the
    agreement while they wait in the collective.
    """
    if not active():
        yield
        return
    try:
        yield
    except Exception as error:  # noqa: BLE001 - every failure must reach the other processes
        _agree(error)
        raise
    _agree(None)


_END = object()


def each_all_or_none(items: Iterable) -> Iterator:
    """Iterate `items` (as many on every process), agreeing after fetching each one: a bad image in one
    process's batch stops every process at that step, instead of leaving them in the next collective."""
    if not active():
        yield from items
        return
    iterator = iter(items)
    while True:
        with all_or_none():
            item = next(iterator, _END)
        if item is _END:
            return
        yield item


def reports_here(error: BaseException) -> bool:
    """Whether the CLI prints `error` on this process: once per group, by the rank that saw it, else rank 0."""
    if isinstance(error, PeerFailed):
        return False
    reported_by = getattr(error, "irank_reported_by_rank", None)
    return rank() == reported_by if reported_by is not None else is_main()
