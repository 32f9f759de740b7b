"""`irank refine`: fine-tune a checkpoint on a (cleaned) manifest and save it with irank metadata."""

from __future__ import annotations

import json
import math

import torch

from irank.formats.files import check_outputs_clear_of_inputs, check_overwrite, output_set, sha256_bytes, sha256_file
from irank.formats.manifest import manifest_sha256
from irank.formats.resume import (
    Resume,
    resume_path,
)
from irank.model.checkpoint import save_checkpoint
from irank.model.margin_log import MarginLog
from irank.model.placement import placement_for
from irank.model.prepare import prepare
from irank.model.refit import refit_head
from irank.model.training import RefineResult, train_epochs
from irank.model.validation import ValidationSet
from irank.options import REFINE, TRAIN, ModelOptions, RunOptions, TrainOptions
from irank.runtime.distributed import (
    active,
    all_or_none,
    writes_here,
)
from irank.runtime.errors import UsageError
from irank.runtime.progress import Reporter


def _check_request(checkpoint: str | None, manifest: str, output: str, val: str | None, model_options: ModelOptions,
                   overwrite: bool, resume: bool | str) -> None:
    """Everything about the command that can be refused before any work (under torchrun: by every process)."""
    if not str(output).endswith(".safetensors"):
        raise UsageError(f"-o {output}: irank writes checkpoints as safetensors; name the output *.safetensors")
    if resume and active():
        raise UsageError("--resume is not available under torchrun (each process would need its own saved "
                         "state); run without it to start afresh")
    check_outputs_clear_of_inputs({"-o": output}, {"checkpoint": checkpoint, "manifest": manifest, "--val": val,
                                                   "--classes file": model_options.classes})
    if writes_here():
        check_overwrite({"-o": output}, overwrite)


def _prepare(checkpoint: str | None, manifest: str, output: str, val: str | None, model_options: ModelOptions,
             run: RunOptions, reporter: Reporter):
    """(the prepared model, its placement, the --val set or None), the output checked against the tensor files."""
    prepared = prepare(checkpoint, manifest, model_options)
    if prepared.manifest.holds_tensors:  # a .safetensors output must not be a file the rows are read from
        sources = prepared.manifest.resolved_paths().sources
        check_outputs_clear_of_inputs({"-o": output}, {f"tensor file {s.written}": str(s.file) for s in sources})
    for note in prepared.notes:
        reporter.info(note)
    for warning in prepared.warnings:
        reporter.warn(warning)
    device = placement_for(run, prepared.model)  # device, memory format and precision
    validation = ValidationSet(prepared, val, run, device, model_options.allow_outside_root) if val else None
    return prepared, device, validation


def _resume_state(output: str, fingerprint: dict, resume: bool | str, reporter: Reporter) -> Resume | None:
    """The state file the run saves after every epoch (None under torchrun, where --resume is refused)."""
    if active():
        return None
    state = Resume(resume_path(output), sha256_bytes(json.dumps(fingerprint, sort_keys=True).encode()), bool(resume))
    if resume == "auto" and state.path.exists() and not state.matches():
        reporter.info(f"{state.path} holds a run with other inputs or options (a --batch-size, say); starting afresh")
        state.resume = False
    elif not resume and state.path.exists():
        reporter.info(f"{state.path} holds an interrupted run; starting afresh (pass --resume to continue it)")
    return state


def _fit(prepared, options: TrainOptions, run: RunOptions, device, reporter: Reporter, validation,
         state: Resume | None, output: str, margins: MarginLog | None = None) -> RefineResult:
    """Train (or refit the head); an interrupt says where the last finished epoch is kept."""
    try:
        if options.scope == "refit":
            if margins is not None:
                raise ValueError("a refit head takes no steps: there are no margins to log")
            return refit_head(prepared, options, run, device, reporter, validation)
        return train_epochs(prepared, options, run, device, reporter, validation, state, margins)
    except KeyboardInterrupt as interrupt:
        if state is not None and state.path.exists():  # what the CLI's one line says
            interrupt.irank_note = (f"{output} was not written; {state.path} holds the last finished epoch: "
                                    "pass --resume to continue")
        raise


def _warn_if_diverged(result: RefineResult, options: TrainOptions, reporter: Reporter) -> None:
    """A training loss that ends above where it started (or is not a number) is a run that diverged: say so,
    with what was kept, instead of a quiet 'best epoch'."""
    losses = [epoch["train_loss"] for epoch in result.history]
    if len(losses) < 2 or (math.isfinite(losses[-1]) and losses[-1] <= losses[0]):
        return
    reporter.warn(f"the training loss rose from {losses[0]:.4g} (epoch 1) to {losses[-1]:.4g} (epoch {len(losses)}): "
                  f"the run diverged; try a lower --lr than {options.lr:g}. The model written is epoch "
                  f"{result.best_epoch}" + (" (the best on --val)" if "val_accuracy" in result.history[0] else ""))


def _fit_and_save(checkpoint: str | None, manifest: str, output: str, options: TrainOptions, defaults: TrainOptions,
                  val: str | None, model_options: ModelOptions, run: RunOptions, reporter: Reporter,
                  provenance_key: str, overwrite: bool = False, resume: bool | str = False,
                  margins: MarginLog | None = None) -> RefineResult:
    """Train (`options`, `defaults` filled in where it leaves a field None), then write the checkpoint with its
    provenance (inputs, options, history) in its irank metadata."""
    with all_or_none():  # under torchrun: every process stops here if any check failed, before any work
        options = options.resolved(defaults)
        _check_request(checkpoint, manifest, output, val, model_options, overwrite, resume)
    torch.manual_seed(options.seed)  # before the model is built: a fresh model's initial weights depend on it
    with all_or_none():
        prepared, device, validation = _prepare(checkpoint, manifest, output, val, model_options, run, reporter)
    manifest_digest = prepared.manifest.table_source.sha256()  # a manifest given as a pipe: its copy's
    fingerprint = {"checkpoint": sha256_file(checkpoint) if checkpoint else None, "manifest": manifest_digest,
                   "val": manifest_sha256(val) if val else None, "options": dict(options.__dict__),
                   "model": dict(model_options.__dict__), "batch_size": run.batch_size,
                   "precision": device.precision, "channels_last": device.channels_last,
                   **({"margins": "logged"} if margins is not None else {})}  # a state without them cannot go on
    state = _resume_state(output, fingerprint, resume, reporter)
    result = _fit(prepared, options, run, device, reporter, validation, state, output, margins)
    _warn_if_diverged(result, options, reporter)
    provenance = {
        "manifest": {"path": manifest, "sha256": manifest_digest, "rows": len(prepared.manifest)},
        "options": dict(options.__dict__),
        "run": {"device": device.device.type, "precision": device.precision, "channels_last": device.channels_last},
        "best_epoch": result.best_epoch,
        "history": result.history,
    }
    if checkpoint:
        provenance["from"] = {"path": checkpoint, "sha256": sha256_file(checkpoint)}
    result.metadata = prepared.metadata(**{provenance_key: provenance}, **prepared.extra_metadata)
    with all_or_none():  # a failed write on rank 0 fails every process
        if writes_here():
            with output_set(overwrite):
                save_checkpoint(prepared.model.cpu(), output, result.metadata)
    if state is not None:
        state.remove()
    return result


def refine(
    checkpoint: str,
    manifest: str,
    *,
    output: str,
    train_options: TrainOptions | None = None,
    val: str | None = None,
    model_options: ModelOptions | None = None,
    run_options: RunOptions | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    resume: bool | str = False,
    defaults: TrainOptions = REFINE,
    margins: MarginLog | None = None,
) -> RefineResult:
    """Fine-tune `checkpoint` on `manifest` (the head only, or the whole network) and write `output`.

    A field of `train_options` left None takes its value from `defaults` (`irank refine`'s, REFINE; a caller
    that has settled every setting itself, as post-train's rounds do, passes them as `defaults`); one given
    where it does nothing is refused.
    With `val`, accuracy on that manifest is measured after every epoch and the best epoch is kept.
    The state after every epoch is saved to `output + '.resume'`; with `resume` an interrupted run
    continues from it and ends with the weights an uninterrupted run would have written (`resume="auto"`:
    a state saved with other inputs or options is discarded instead of refused).
    With `margins` (a `MarginLog` of the manifest's rows), every step's margins of its rows are logged there.
    """
    return _fit_and_save(checkpoint, manifest, output, train_options or TrainOptions(), defaults, val,
                         model_options or ModelOptions(), run_options or RunOptions(), reporter or Reporter(), "refined",
                         overwrite=overwrite, resume=resume, margins=margins)


def train(
    arch: str,
    manifest: str,
    *,
    output: str,
    train_options: TrainOptions | None = None,
    val: str | None = None,
    model_options: ModelOptions | None = None,
    run_options: RunOptions | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> RefineResult:
    """Train a fresh `arch` from random weights on `manifest` (all layers) and write `output`."""
    model_options = model_options or ModelOptions()
    model_options.arch = arch
    return _fit_and_save(None, manifest, output, train_options or TrainOptions(), TRAIN, val, model_options,
                         run_options or RunOptions(), reporter or Reporter(), "trained", overwrite=overwrite,
                         resume=resume)
