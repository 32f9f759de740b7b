"""The margins a training gives each row's label, summed as it runs (area under the margin, `irank.core.margins`)."""

from __future__ import annotations

import torch

from irank.core.margins import area_under_margin, given_margins
from irank.runtime.distributed import all_reduce_sum


class MarginLog:
    """Each row's given-label margin summed over the training steps that saw it, and how many did: kept on the
    training's device (no step waits for the host), saved with every epoch's state so a resumed run goes on
    counting. Under torchrun each process adds its own rows; `area_under_margin` sums every process's."""

    KEYS = ("margins.sum", "margins.count")

    def __init__(self, rows: int | None = None):
        self.rows = rows  # None: the training's, once it starts (the rows it reads, unreadable ones skipped)
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def _ready(self, device: torch.device) -> None:
        if self.sums is None:
            self.sums = torch.zeros(self.rows, dtype=torch.float64, device=device)
            self.counts = torch.zeros(self.rows, dtype=torch.float64, device=device)
        elif self.sums.device != device:  # restored on the CPU: moved once, to the training's device
            self.sums, self.counts = self.sums.to(device), self.counts.to(device)

    def add(self, rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """A step's logits of `rows` (row numbers in the manifest) against their given `labels`."""
        with torch.no_grad():
            self._ready(logits.device)
            rows = rows.to(logits.device)
            self.sums.index_add_(0, rows, given_margins(logits.detach().double(), labels))
            self.counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64, device=logits.device))

    def state(self) -> dict[str, torch.Tensor]:
        if self.sums is None:
            return {}
        return dict(zip(self.KEYS, (self.sums.cpu(), self.counts.cpu())))

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.KEYS[0] in tensors:
            self.sums, self.counts = (tensors[key].clone() for key in self.KEYS)

    def area_under_margin(self) -> torch.Tensor:
        """Each row's mean margin over the run (float64, on the CPU)."""
        self._ready(torch.device("cpu"))
        return area_under_margin(all_reduce_sum(self.sums).cpu(), all_reduce_sum(self.counts).cpu())
