"""A clean labelled set scored after every epoch of a training run (--val)."""

from __future__ import annotations

import torch

from irank.core.metrics import accuracy_report
from irank.formats.manifest import check_inside_root, encode_labels, read_manifest
from irank.model.forward import forward_pass
from irank.model.inputs import make_shard_loader
from irank.model.placement import Placement
from irank.model.prepare import Prepared, check_same_input
from irank.options import RunOptions
from irank.runtime.distributed import all_or_none, local_rows, shard_of
from irank.runtime.progress import Reporter


class ValidationSet:
    """A clean labelled manifest on which every epoch is scored; head-only training scores cached features.

    Under torchrun each process scores its block of the rows and the correct predictions are summed.
    """

    def __init__(self, prepared: Prepared, path: str, run: RunOptions, device: "torch.device | Placement", allow_outside_root: bool = False):
        manifest = read_manifest(path)
        if not allow_outside_root:
            check_inside_root(manifest)
        check_same_input(prepared.input_shape, manifest, "--val")
        self.labels = torch.from_numpy(encode_labels(manifest, prepared.classes))
        self.shard = shard_of(len(self.labels))
        self.loader, self.num_rows, self.first_row = make_shard_loader(
            manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size, num_workers=run.num_workers,
            shard=self.shard)
        self.classes = prepared.classes
        self.place = Placement.of(device)
        self.cached_inputs: torch.Tensor | None = None

    def accuracy(self, prepared: Prepared, reporter: Reporter, cache_head_inputs: bool) -> float:
        if cache_head_inputs and self.cached_inputs is not None:
            with torch.no_grad():
                logits = prepared.head(self.cached_inputs.to(self.place.device)).float().cpu()
        else:
            with all_or_none():
                outputs = forward_pass(prepared.model, prepared.head, self.loader, num_rows=self.num_rows,
                                       device=self.place, reporter=reporter, description="validation",
                                       first_row=self.first_row)
            logits = outputs.logits
            if cache_head_inputs:
                self.cached_inputs = outputs.head_inputs
        if self.shard is None:
            return accuracy_report(logits, self.labels, self.classes)["accuracy"]
        correct = (logits.argmax(dim=1) == local_rows(self.labels, self.shard)).sum().reshape(1)
        # float32 like accuracy_report's mean, so that one process and many agree to the bit
        return float(self.shard.sum(correct).float()[0] / self.shard.total)
