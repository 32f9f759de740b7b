"""The one forward pass: head inputs and logits for every sample, streamed in batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from irank.core.influence import chunk_size, spans
from irank.core.protocols import Shard
from irank.model.inputs import batches, make_shard_loader
from irank.model.placement import Placement, placement_for
from irank.model.prepare import Prepared
from irank.model.transfer import HostRows
from irank.options import RunOptions
from irank.runtime.errors import NumericsError
from irank.runtime.memory import DiskRows, MemoryBudget
from irank.runtime.progress import Reporter


@dataclass
class ForwardOutputs:
    """Per-sample tensors, row-aligned with the manifest."""

    head_inputs: torch.Tensor | DiskRows  # (n, D): what flows into the head, flattened
    logits: torch.Tensor | DiskRows  # (n, C): what comes out of it


def forward_pass(
    model: nn.Module,
    head: nn.Linear,
    loader: DataLoader,
    *,
    num_rows: int,
    device: torch.device | Placement,
    reporter: Reporter | None = None,
    description: str = "forward pass",
    first_row: int = 0,
    budget: MemoryBudget | None = None,
) -> ForwardOutputs:
    """Run the model once over the loader in eval mode, capturing the head's input and output.

    `first_row`: the manifest row of the loader's row 0, for messages (a process's shard under torchrun).
    `budget`: where the per-sample arrays go (in memory, or past the budget in a temporary file).
    `device`: a device, or a `Placement` (memory format and precision too).
    """
    budget = budget or MemoryBudget()
    reporter = reporter or Reporter()
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        captured["inputs"] = inputs[0].detach()
        captured["logits"] = output.detach()

    head_inputs = budget.array(num_rows, head.in_features)
    logits = budget.array(num_rows, head.out_features)
    place = Placement.of(device)
    place.place_model(model).eval()
    handle = head.register_forward_hook(hook)
    try:
        with torch.inference_mode(), place.autocast(), reporter.task(description, len(loader)) as advance, \
                HostRows(place.device) as host:
            for images, rows in batches(loader):
                model(place.inputs(images))
                host.put([(head_inputs, rows, captured["inputs"].reshape(len(rows), -1)),
                          (logits, rows, captured["logits"].reshape(len(rows), -1))])
                advance(1)
    finally:
        handle.remove()
    check_finite(head_inputs, logits, first_row)
    return ForwardOutputs(head_inputs=head_inputs, logits=logits)


def check_finite(head_inputs: torch.Tensor, logits: torch.Tensor | None, first_row: int = 0,
                 row_order: "list[int] | range | None" = None) -> None:
    """Refuse NaN or infinite outputs (`logits` None: of the features alone), naming manifest rows:
    `first_row` + i, or row_order[i]."""
    bad = torch.zeros(len(head_inputs), dtype=torch.bool)
    # isfinite makes float temporaries: a chunk of rows at a time
    width = head_inputs.shape[1] + (logits.shape[1] if logits is not None else 0)
    for start, end in spans(len(head_inputs), chunk_size(width)):
        bad[start:end] = ~torch.isfinite(head_inputs[start:end]).all(dim=1)
        if logits is not None:
            bad[start:end] |= ~torch.isfinite(logits[start:end]).all(dim=1)
    if bad.any():
        where = torch.nonzero(bad).flatten().tolist()
        rows = [row_order[i] + 1 for i in where] if row_order is not None else [i + 1 + first_row for i in where]
        shown = ", ".join(str(r) for r in rows[:8]) + (f" (+{len(rows) - 8} more)" if len(rows) > 8 else "")
        raise NumericsError(f"the model produced NaN or infinite values in {len(rows)} rows (manifest rows {shown})")


def shard_loader(prepared: Prepared, run: RunOptions, shard: Shard | None = None) -> tuple[object, int, int]:
    """(loader, rows it yields, manifest row of its first row): all rows, or this process's block under torchrun."""
    return make_shard_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                             num_workers=run.num_workers, shard=shard)


def run_forward(prepared: Prepared, run: RunOptions, reporter: Reporter, shard: Shard | None = None,
                budget: MemoryBudget | None = None) -> ForwardOutputs:
    """Head inputs and logits of every row (of this process's block of rows, with a `shard`); with a
    `budget`, past it they go to temporary files."""
    loader, num_rows, first_row = shard_loader(prepared, run, shard)
    return forward_pass(
        prepared.model, prepared.head, loader, num_rows=num_rows,
        device=placement_for(run, prepared.model), reporter=reporter, first_row=first_row, budget=budget,
    )
