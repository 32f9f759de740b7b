"""`irank eval`: accuracy of a checkpoint on a labelled manifest, overall and per class."""

from __future__ import annotations

import torch

from irank.core.metrics import accuracy_report
from irank.model.forward import run_forward
from irank.model.prepare import prepare
from irank.options import ModelOptions, RunOptions
from irank.runtime.distributed import all_or_none, shard_of
from irank.runtime.errors import UsageError
from irank.runtime.progress import Reporter


def evaluate(
    checkpoint: str,
    manifest: str,
    *,
    model_options: ModelOptions | None = None,
    run_options: RunOptions | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Accuracy of `checkpoint` on the labels of `manifest`."""
    reporter = reporter or Reporter()
    run_options = run_options or RunOptions()
    if run_options.batch_size <= 0:
        raise UsageError(f"--batch-size {run_options.batch_size}: must be positive")
    with all_or_none():  # under torchrun each process reads its block of rows; a failure in one stops all
        prepared = prepare(checkpoint, manifest, model_options or ModelOptions())
    for warning in prepared.warnings:
        reporter.warn(warning)
    with all_or_none():
        shard = shard_of(len(prepared.labels))
        outputs = run_forward(prepared, run_options, reporter, shard)
    logits = outputs.logits if shard is None else shard.gather(outputs.logits)
    report = accuracy_report(logits, torch.from_numpy(prepared.labels), prepared.classes)
    report["checkpoint"] = checkpoint
    report["manifest"] = manifest
    return report
