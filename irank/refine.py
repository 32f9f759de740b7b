"""`irank refine`: fine-tune a checkpoint on a (cleaned) manifest and save it with irank metadata."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .data import AUGMENTS, batches, make_loader
from .errors import UsageError
from .evaluation import accuracy_report
from .features import forward_pass, resolve_device
from .files import check_outputs_clear_of_inputs, check_overwrite, sha256_bytes, sha256_file
from .loading import ModelOptions, Prepared, RunOptions, check_same_input, prepare
from .linear import fit_softmax_regression
from .manifest import check_inside_root, encode_labels, read_manifest
from .progress import Reporter
from .resume import Resume, TrainingState, pack_optimizer, prefixed, resume_path, unpack_optimizer, unprefixed

SCOPES = ("head", "full", "refit")
LOSSES = ("ce", "gce")
GCE_Q = 0.7


def training_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean cross-entropy, or generalized cross-entropy (1 − p_y^q) / q, which bounds a wrong label's pull."""
    if kind == "gce":
        label_prob = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1).clamp_min(1e-7)
        return ((1 - label_prob**GCE_Q) / GCE_Q).mean()
    return F.cross_entropy(logits, labels)


@dataclass
class TrainOptions:
    scope: str = "head"
    epochs: int = 5
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: str = "none"
    seed: int = 0
    l2: float = 1e-3  # scope refit: L2 strength on standardized features
    layer: str | None = None  # scope refit: refit on this layer's pooled output instead of the head's input
    loss: str = "ce"  # ce, or gce: generalized cross-entropy (Zhang & Sabuncu 2018), robust to label noise

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise UsageError(f"--scope {self.scope}: choose from {', '.join(SCOPES)}")
        if self.augment not in AUGMENTS:
            raise UsageError(f"--augment {self.augment}: choose from {', '.join(AUGMENTS)}")
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be at least 1")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: must be positive")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay {self.weight_decay}: must be 0 or more")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss {self.loss}: choose from {', '.join(LOSSES)}")
        if not self.l2 > 0:
            raise UsageError(f"--l2 {self.l2}: must be positive")
        if self.layer and self.scope != "refit":
            raise UsageError("--layer needs --scope refit (the probe is refit on that layer's features)")


@dataclass
class RefineResult:
    history: list[dict] = field(default_factory=list)  # per epoch: train loss, val accuracy
    best_epoch: int = 0
    metadata: dict = field(default_factory=dict)


class ValidationSet:
    """A clean labelled manifest on which every epoch is scored; head-only training scores cached features."""

    def __init__(self, prepared: Prepared, path: str, run: RunOptions, device: torch.device, allow_outside_root: bool = False):
        manifest = read_manifest(path)
        if not allow_outside_root:
            check_inside_root(manifest)
        check_same_input(prepared.input_shape, manifest, "--val")
        self.labels = torch.from_numpy(encode_labels(manifest, prepared.classes))
        self.loader = make_loader(manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size, num_workers=run.num_workers)
        self.classes = prepared.classes
        self.device = device
        self.cached_inputs: torch.Tensor | None = None

    def accuracy(self, prepared: Prepared, reporter: Reporter, cache_head_inputs: bool) -> float:
        if cache_head_inputs and self.cached_inputs is not None:
            with torch.no_grad():
                logits = prepared.head(self.cached_inputs.to(self.device)).float().cpu()
        else:
            outputs = forward_pass(prepared.model, prepared.head, self.loader, num_rows=len(self.labels),
                                   device=self.device, reporter=reporter, description="validation")
            logits = outputs.logits
            if cache_head_inputs:
                self.cached_inputs = outputs.head_inputs
        return accuracy_report(logits, self.labels, self.classes)["accuracy"]


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def attach_probe(prepared: Prepared, layer: str, in_features: int) -> None:
    """Turn the prepared model into backbone-up-to-`layer` + a fresh linear `probe` head (in place)."""
    from .layers import ProbeModel

    if prepared.checkpoint is not None and prepared.checkpoint.metadata.get("probe"):
        raise UsageError("this checkpoint is already cut at a layer; refit --layer on the original checkpoint")
    prepared.model = ProbeModel(prepared.model, layer, in_features, len(prepared.classes))
    prepared.head_name, prepared.head = "probe", prepared.model.probe
    prepared.extra_metadata["probe"] = {"layer": layer, "in_features": in_features}


def refit_head(prepared: Prepared, options: TrainOptions, run: RunOptions, device: torch.device,
               reporter: Reporter, validation: ValidationSet | None) -> RefineResult:
    """Replace the head by the L2-regularized softmax regression fitted from scratch on frozen features:
    the head's input, or with `options.layer` a layer's pooled output (the model is then cut there)."""
    from .layers import layer_features

    model = prepared.model.to(device)
    loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                         num_workers=run.num_workers)
    if options.layer:
        head_inputs = layer_features(model, options.layer, loader, num_rows=len(prepared.labels), device=device,
                                     reporter=reporter)
        attach_probe(prepared, options.layer, head_inputs.shape[1])
    else:
        head_inputs = forward_pass(model, prepared.head, loader, num_rows=len(prepared.labels), device=device,
                                   reporter=reporter, description="head inputs").head_inputs
    model, head = prepared.model.to(device), prepared.head
    labels = torch.from_numpy(prepared.labels)
    weight, bias = fit_softmax_regression(head_inputs, labels, head.out_features, l2=options.l2)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(bias.to(head.bias))
        else:
            reporter.warn("the head has no bias: the refit's intercept is dropped")
        logits = head(head_inputs.to(device)).float().cpu()
    record = {"epoch": 1, "train_loss": float(F.cross_entropy(logits, labels))}
    if validation is not None:
        record["val_accuracy"] = validation.accuracy(prepared, reporter, cache_head_inputs=True)
    return RefineResult(history=[record], best_epoch=1)


def train_epochs(prepared: Prepared, options: TrainOptions, run: RunOptions, device: torch.device,
                 reporter: Reporter, validation: ValidationSet | None, resume: Resume | None = None) -> RefineResult:
    """The training loop. Head scope with no augmentation trains on head inputs computed once.

    With `resume`, the state after every epoch is saved to its file, and a saved state (when
    `resume.resume`) is continued from: the weights come out as if training had never stopped.
    """
    if options.scope == "refit":
        return refit_head(prepared, options, run, device, reporter, validation)
    torch.manual_seed(options.seed)
    model, head = prepared.model.to(device), prepared.head
    labels = torch.from_numpy(prepared.labels)
    head_only = options.scope == "head"
    cached = head_only and options.augment == "none"
    for parameter in model.parameters():
        parameter.requires_grad_(not head_only)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    paths = prepared.manifest.resolved_paths()
    if cached:
        plain = make_loader(paths, prepared.preprocess, batch_size=run.batch_size, num_workers=run.num_workers)
        head_inputs = forward_pass(model, head, plain, num_rows=len(labels), device=device, reporter=reporter,
                                   description="head inputs").head_inputs
        steps_per_epoch = math.ceil(len(labels) / run.batch_size)
    else:
        loader = make_loader(paths, prepared.preprocess, batch_size=run.batch_size, num_workers=run.num_workers,
                             augment=options.augment, shuffle=True, seed=options.seed)
        steps_per_epoch = len(loader)
    total_steps = options.epochs * steps_per_epoch
    result = RefineResult()
    best_accuracy, best_state, step = -1.0, None, 0
    generator = torch.Generator().manual_seed(options.seed)
    start_epoch = 1
    saved = resume.load() if resume else None
    if saved is not None:
        model.load_state_dict(unprefixed("model", saved.tensors))
        unpack_optimizer(optimizer, saved.tensors)
        torch.set_rng_state(saved.tensors["rng.torch"])
        generator.set_state(saved.tensors["rng.order"])
        if not cached:
            loader.generator.set_state(saved.tensors["rng.loader"])
        best_state = unprefixed("best", saved.tensors) or None
        step, best_accuracy = saved.info["step"], saved.info["best_accuracy"]
        result.history, result.best_epoch = saved.info["history"], saved.info["best_epoch"]
        start_epoch = saved.info["epoch"] + 1
        reporter.info(f"resuming from {resume.path}: {saved.info['epoch']} of {options.epochs} epochs done")
    for epoch in range(start_epoch, options.epochs + 1):
        running, seen = 0.0, 0
        if head_only:
            model.eval()  # a frozen backbone keeps its batch-norm statistics
        else:
            model.train()
        with reporter.task(f"epoch {epoch}/{options.epochs}", steps_per_epoch) as advance:
            if cached:
                order = torch.randperm(len(labels), generator=generator)
                chunks = [(None, order[i : i + run.batch_size]) for i in range(0, len(labels), run.batch_size)]
            else:
                chunks = batches(loader)
            for images, rows in chunks:
                for group in optimizer.param_groups:
                    group["lr"] = options.lr * _cosine(step, total_steps)
                if cached:
                    logits = head(head_inputs[rows].to(device))
                else:
                    logits = model(images.to(device, non_blocking=True))
                loss = training_loss(logits, labels[rows].to(device), options.loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * len(rows)
                seen += len(rows)
                step += 1
                advance(1)
        record = {"epoch": epoch, "train_loss": running / max(1, seen)}
        if validation is not None:
            record["val_accuracy"] = validation.accuracy(prepared, reporter, cache_head_inputs=head_only)
            if record["val_accuracy"] > best_accuracy:
                best_accuracy, result.best_epoch = record["val_accuracy"], epoch
                best_state = copy.deepcopy(model.state_dict())
        else:
            result.best_epoch = epoch
        result.history.append(record)
        if resume is not None:
            tensors = {**prefixed("model", model.state_dict()), **pack_optimizer(optimizer),
                       "rng.torch": torch.get_rng_state(), "rng.order": generator.get_state()}
            if not cached:
                tensors["rng.loader"] = loader.generator.get_state()
            if best_state is not None:
                tensors.update(prefixed("best", best_state))
            resume.save(TrainingState(tensors, {"epoch": epoch, "step": step, "history": result.history,
                                                "best_epoch": result.best_epoch, "best_accuracy": best_accuracy}))
        reporter.info("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    if best_state is not None:
        model.load_state_dict(best_state)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return result


def _fit_and_save(checkpoint: str | None, manifest: str, output: str, options: TrainOptions, val: str | None,
                  model_options: ModelOptions, run: RunOptions, reporter: Reporter, provenance_key: str,
                  overwrite: bool = False, resume: bool = False) -> RefineResult:
    options.validate()
    if not str(output).endswith(".safetensors"):
        raise UsageError(f"-o {output}: irank writes checkpoints as safetensors; name the output *.safetensors")
    check_outputs_clear_of_inputs({"-o": output}, {"checkpoint": checkpoint, "manifest": manifest, "--val": val})
    check_overwrite({"-o": output}, overwrite)
    torch.manual_seed(options.seed)  # before the model is built: a fresh model's initial weights depend on it
    prepared = prepare(checkpoint, manifest, model_options)
    for note in prepared.notes:
        reporter.info(note)
    device = resolve_device(run.device)
    validation = ValidationSet(prepared, val, run, device, model_options.allow_outside_root) if val else None
    inputs = {"checkpoint": sha256_file(checkpoint) if checkpoint else None, "manifest": sha256_file(manifest),
              "val": sha256_file(val) if val else None, "options": dict(options.__dict__),
              "model": dict(model_options.__dict__), "batch_size": run.batch_size}
    state = Resume(resume_path(output), sha256_bytes(json.dumps(inputs, sort_keys=True).encode()), resume)
    if not resume and state.path.exists():
        reporter.info(f"{state.path} holds an interrupted run; starting afresh (pass --resume to continue it)")
    result = train_epochs(prepared, options, run, device, reporter, validation, state)
    provenance = {
        "manifest": {"path": manifest, "sha256": sha256_file(manifest), "rows": len(prepared.manifest)},
        "options": dict(options.__dict__),
        "best_epoch": result.best_epoch,
        "history": result.history,
    }
    if checkpoint:
        provenance["from"] = {"path": checkpoint, "sha256": sha256_file(checkpoint)}
    result.metadata = prepared.metadata(**{provenance_key: provenance}, **prepared.extra_metadata)
    save_checkpoint(prepared.model.cpu(), output, result.metadata)
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
    resume: bool = False,
) -> RefineResult:
    """Fine-tune `checkpoint` on `manifest` (the head only, or the whole network) and write `output`.

    With `val`, accuracy on that manifest is measured after every epoch and the best epoch is kept.
    The state after every epoch is saved to `output + '.resume'`; with `resume` an interrupted run
    continues from it and ends with the weights an uninterrupted run would have written.
    """
    return _fit_and_save(checkpoint, manifest, output, train_options or TrainOptions(), val,
                         model_options or ModelOptions(), run_options or RunOptions(), reporter or Reporter(), "refined",
                         overwrite=overwrite, resume=resume)


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
    options = train_options or TrainOptions(scope="full", epochs=20, lr=0.05)
    return _fit_and_save(None, manifest, output, options, val, model_options,
                         run_options or RunOptions(), reporter or Reporter(), "trained", overwrite=overwrite,
                         resume=resume)
