"""Per-batch outputs copied from the device into per-sample host arrays without stalling the device.

A plain `array.index_copy_(0, rows, out.cpu())` after every batch makes the host wait for the GPU to
finish that batch before it can queue the next one, so the GPU idles while Python launches the next
batch's kernels. On a CUDA device `HostRows` instead starts each batch's copies into page-locked memory
without waiting and writes them into the arrays one batch later, once the next batch has been queued.
On other devices it writes at once, as before. The arrays end up the same either way (tested).
"""

from __future__ import annotations

import torch


class HostRows:
    """Write device tensors into rows of host arrays (`torch.Tensor` or `DiskRows`), one batch behind on CUDA.

    Use as a context manager, or call `flush()` before reading the arrays: the last batch's copies are
    written then.
    """

    def __init__(self, device: torch.device, deferred: bool | None = None):
        """`deferred` None: one batch behind on CUDA, at once elsewhere (True elsewhere: behind too, for tests)."""
        self.cuda = device.type == "cuda"
        self.deferred = self.cuda if deferred is None else deferred
        self._pending: tuple[list, object] | None = None

    def put(self, writes: list[tuple[object, torch.Tensor, torch.Tensor]]) -> None:
        """`writes`: (array, rows, values) triples: values[i] (any float dtype, any device) goes to array row rows[i], as float32."""
        if not self.deferred:
            for array, rows, values in writes:
                array.index_copy_(0, rows, values.float().cpu())  # index_copy_: on CPU many times faster than [rows] =
            return
        staged = []
        for array, rows, values in writes:
            values = values.float()  # converted on the device, then copied as it is
            if self.cuda:
                host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host.copy_(values, non_blocking=True)
            else:
                host = values.cpu().clone()
            staged.append((array, rows, host))
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record()
        self.flush()
        self._pending = (staged, done)

    def flush(self) -> None:
        """Write the copies still pending (waiting for them to arrive)."""
        if self._pending is None:
            return
        staged, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()
        for array, rows, host in staged:
            array.index_copy_(0, rows, host)

    def __enter__(self) -> "HostRows":
        return self

    def __exit__(self, kind, _value, _traceback) -> None:
        if kind is None:
            self.flush()
        else:
            self._pending = None  # the pass failed: what it had not written is not wanted
