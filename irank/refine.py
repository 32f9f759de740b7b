"""`irank refine`: fine-tune a checkpoint on a (cleaned) manifest and save it with irank metadata."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import save_checkpoint
from .data import AUGMENTS, ShardedShuffle, batches, make_loader, make_shard_loader, resolve_augment
from .distributed import (active, all_or_none, all_reduce_sum, broadcast_, ddp_device_ids, each_all_or_none,
                          local_rows, rank, shard_of, world_size, writes_here)
from .errors import UsageError
from .evaluation import accuracy_report
from .features import forward_pass
from .placement import Placement
from .files import check_outputs_clear_of_inputs, check_overwrite, output_set, sha256_bytes, sha256_file
from .loading import ModelOptions, Prepared, RunOptions, check_same_input, prepare
from .linear import fit_softmax_regression
from .manifest import check_inside_root, encode_labels, read_manifest
from .progress import Reporter
from .resume import Resume, TrainingState, pack_optimizer, prefixed, resume_path, unpack_optimizer, unprefixed

SCOPES = ("head", "full", "refit")
LOSSES = ("ce", "gce")
GCE_Q = 0.7


def training_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, reduction: str = "mean") -> torch.Tensor:
    """Mean (or with reduction="sum", summed) cross-entropy, or generalized cross-entropy (1 − p_y^q) / q,
    which bounds a wrong label's pull."""
    if kind == "gce":
        label_prob = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1).clamp_min(1e-7)
        losses = (1 - label_prob**GCE_Q) / GCE_Q
        return losses.sum() if reduction == "sum" else losses.mean()
    return F.cross_entropy(logits, labels, reduction=reduction)


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

    def idle(self) -> dict[str, str]:
        """The options that do nothing at this scope (field name → why), for a caller that knows which were given."""
        if self.scope == "refit":
            why = "--scope refit refits the head from scratch as a convex L2 regression on frozen features (--l2, --layer)"
            return {name: why for name in ("epochs", "lr", "weight_decay", "augment", "loss", "seed")}
        return {"l2": f"--l2 is the L2 of --scope refit; --scope {self.scope} trains by SGD (see --weight-decay)"}


@dataclass
class RefineResult:
    history: list[dict] = field(default_factory=list)  # per epoch: train loss, val accuracy
    best_epoch: int = 0
    metadata: dict = field(default_factory=dict)


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


def refit_head(prepared: Prepared, options: TrainOptions, run: RunOptions, device: "torch.device | Placement",
               reporter: Reporter, validation: ValidationSet | None) -> RefineResult:
    """Replace the head by the L2-regularized softmax regression fitted from scratch on frozen features:
    the head's input, or with `options.layer` a layer's pooled output (the model is then cut there)."""
    from .layers import layer_features

    place = Placement.of(device)
    device = place.device
    model = place.place_model(prepared.model)
    shard = shard_of(len(prepared.labels))  # None with one process
    with all_or_none():
        loader, num_rows, first_row = make_shard_loader(prepared.manifest.resolved_paths(), prepared.preprocess,
                                                        batch_size=run.batch_size, num_workers=run.num_workers, shard=shard)
        if options.layer:
            head_inputs = layer_features(model, options.layer, loader, num_rows=num_rows, device=place,
                                         reporter=reporter, first_row=first_row)
        else:
            head_inputs = forward_pass(model, prepared.head, loader, num_rows=num_rows, device=place,
                                       reporter=reporter, description="head inputs", first_row=first_row).head_inputs
    if options.layer:
        attach_probe(prepared, options.layer, head_inputs.shape[1])
    model, head = place.place_model(prepared.model), prepared.head
    labels = local_rows(torch.from_numpy(prepared.labels), shard)
    weight, bias = fit_softmax_regression(head_inputs, labels, head.out_features, l2=options.l2, shard=shard)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(bias.to(head.bias))
        else:
            reporter.warn("the head has no bias: the refit's intercept is dropped")
        logits = head(head_inputs.to(device)).float().cpu()
    if shard is None:
        record = {"epoch": 1, "train_loss": float(F.cross_entropy(logits, labels))}
    else:
        summed = shard.sum(F.cross_entropy(logits, labels, reduction="sum").reshape(1))
        record = {"epoch": 1, "train_loss": float(summed[0] / shard.total)}
    if validation is not None:
        record["val_accuracy"] = validation.accuracy(prepared, reporter, cache_head_inputs=True)
    return RefineResult(history=[record], best_epoch=1)


def train_epochs(prepared: Prepared, options: TrainOptions, run: RunOptions, device: "torch.device | Placement",
                 reporter: Reporter, validation: ValidationSet | None, resume: Resume | None = None) -> RefineResult:
    """The training loop. Head scope with no augmentation trains on head inputs computed once.

    With `resume`, the state after every epoch is saved to its file, and a saved state (when
    `resume.resume`) is continued from: the weights come out as if training had never stopped.

    Under torchrun (no `resume` there): the cached head path splits every batch of the one-process run
    by which process holds its rows and sums the gradients, so it computes what one process computes;
    the other paths train with DistributedDataParallel on `ShardedShuffle`'s share of each epoch.
    """
    if options.scope == "refit":
        return refit_head(prepared, options, run, device, reporter, validation)
    place = Placement.of(device)
    device = place.device
    shard = shard_of(len(prepared.labels))  # None with one process
    torch.manual_seed(options.seed if shard is None else options.seed + rank())  # augmentation draws differ by process
    model, head = place.place_model(prepared.model), prepared.head
    labels = torch.from_numpy(prepared.labels)
    head_only = options.scope == "head"
    paths = prepared.manifest.resolved_paths()
    cached = head_only and resolve_augment(options.augment, paths, prepared.preprocess) == "none"
    for parameter in model.parameters():
        parameter.requires_grad_(not head_only)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    forward = model
    if cached:
        with all_or_none():
            plain, num_rows, first_row = make_shard_loader(paths, prepared.preprocess, batch_size=run.batch_size,
                                                           num_workers=run.num_workers, shard=shard)
            head_inputs = forward_pass(model, head, plain, num_rows=num_rows, device=place, reporter=reporter,
                                       description="head inputs", first_row=first_row).head_inputs
        steps_per_epoch = math.ceil(len(labels) / run.batch_size)
    elif shard is None:
        loader = make_loader(paths, prepared.preprocess, batch_size=run.batch_size, num_workers=run.num_workers,
                             augment=options.augment, shuffle=True, seed=options.seed)
        steps_per_epoch = len(loader)
    else:  # each process takes its share of every epoch's order, in batches of its share of --batch-size
        order = ShardedShuffle(len(labels), seed=options.seed, index=rank(), parts=world_size())
        loader = make_loader(paths, prepared.preprocess, batch_size=math.ceil(run.batch_size / world_size()),
                             num_workers=run.num_workers, augment=options.augment, sampler=order)
        steps_per_epoch = len(loader)
        # A model cut at a layer (a refit probe) leaves the modules after the cut unused.
        forward = DistributedDataParallel(model, device_ids=ddp_device_ids() if device.type == "cuda" else None,
                                          find_unused_parameters=bool(prepared.extra_metadata.get("probe")))
    total_steps = options.epochs * steps_per_epoch
    # fp16 gradients underflow without loss scaling; bf16 and full precision need none (the scaler then passes through)
    scaler = torch.amp.GradScaler(device.type, enabled=place.autocast_dtype == torch.float16 and not cached)
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
        # the loss is summed on the device and read once an epoch: reading it every step would make the host
        # wait for the GPU before it queues the next step
        running, seen = torch.zeros((), dtype=torch.float64, device=device), 0
        if head_only:
            model.eval()  # a frozen backbone keeps its batch-norm statistics
        else:
            model.train()
        with reporter.task(f"epoch {epoch}/{options.epochs}", steps_per_epoch) as advance:
            if cached:
                order = torch.randperm(len(labels), generator=generator)
                chunks = [(None, order[i : i + run.batch_size]) for i in range(0, len(labels), run.batch_size)]
            else:
                chunks = each_all_or_none(batches(loader))  # a bad image in any process stops them all
            for images, rows in chunks:
                for group in optimizer.param_groups:
                    group["lr"] = options.lr * _cosine(step, total_steps)
                if cached and shard is not None:  # this process's rows of the batch, their loss over the whole batch
                    here = rows[(rows >= shard.start) & (rows < shard.stop)]
                    logits = head(head_inputs[here - shard.start].to(device))
                    loss = training_loss(logits, labels[here].to(device), options.loss, reduction="sum") / len(rows)
                elif cached:
                    logits = head(head_inputs[rows].to(device))
                    loss = training_loss(logits, labels[rows].to(device), options.loss)
                else:
                    with place.autocast():
                        logits = forward(place.inputs(images))
                    loss = training_loss(logits.float(), labels[rows].to(device), options.loss)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cached and shard is not None:
                    loss = sum_gradients(trainable, loss)
                scaler.step(optimizer)
                scaler.update()
                running += loss.detach().double() * len(rows)
                seen += len(rows)
                step += 1
                advance(1)
        running = float(running)
        if shard is not None and not cached:
            running, seen = (float(total) for total in all_reduce_sum(torch.tensor([running, float(seen)], dtype=torch.float64)))
            for buffer in model.buffers():  # batch-norm statistics: rank 0's, as DistributedDataParallel uses
                broadcast_(buffer)
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


def sum_gradients(parameters: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Replace each parameter's gradient by its sum over every process (torchrun); returns the summed loss."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    summed = all_reduce_sum(torch.cat([loss.detach().reshape(1)] + [g.reshape(-1) for g in grads]))
    offset = 1
    for parameter in parameters:
        parameter.grad = summed[offset : offset + parameter.numel()].view_as(parameter).clone()
        offset += parameter.numel()
    return summed[0]


def _fit_and_save(checkpoint: str | None, manifest: str, output: str, options: TrainOptions, val: str | None,
                  model_options: ModelOptions, run: RunOptions, reporter: Reporter, provenance_key: str,
                  overwrite: bool = False, resume: bool | str = False) -> RefineResult:
    with all_or_none():  # under torchrun: every process stops here if any check failed, before any work
        options.validate()
        if not str(output).endswith(".safetensors"):
            raise UsageError(f"-o {output}: irank writes checkpoints as safetensors; name the output *.safetensors")
        if resume and active():
            raise UsageError("--resume is not available under torchrun (each process would need its own saved "
                             "state); run without it to start afresh")
        check_outputs_clear_of_inputs({"-o": output}, {"checkpoint": checkpoint, "manifest": manifest, "--val": val,
                                                       "--classes file": model_options.classes})
        if writes_here():
            check_overwrite({"-o": output}, overwrite)
    torch.manual_seed(options.seed)  # before the model is built: a fresh model's initial weights depend on it
    with all_or_none():
        prepared = prepare(checkpoint, manifest, model_options)
        if prepared.manifest.holds_tensors:  # a .safetensors output must not be a file the rows are read from
            sources = prepared.manifest.resolved_paths().sources
            check_outputs_clear_of_inputs({"-o": output}, {f"tensor file {s.written}": str(s.file) for s in sources})
        for note in prepared.notes:
            reporter.info(note)
        device = run.placement(prepared.model)  # device, memory format and precision
        validation = ValidationSet(prepared, val, run, device, model_options.allow_outside_root) if val else None
    manifest_sha256 = prepared.manifest.table_source.sha256()  # a manifest given as a pipe: its copy's
    inputs = {"checkpoint": sha256_file(checkpoint) if checkpoint else None, "manifest": manifest_sha256,
              "val": sha256_file(val) if val else None, "options": dict(options.__dict__),
              "model": dict(model_options.__dict__), "batch_size": run.batch_size,
              "precision": device.precision, "channels_last": device.channels_last}
    state = None
    if not active():  # under torchrun no state is saved: --resume is refused there
        state = Resume(resume_path(output), sha256_bytes(json.dumps(inputs, sort_keys=True).encode()), bool(resume))
        if resume == "auto" and state.path.exists() and not state.matches():
            reporter.info(f"{state.path} holds a run with other inputs or options (a --batch-size, say); starting afresh")
            state.resume = False
        elif not resume and state.path.exists():
            reporter.info(f"{state.path} holds an interrupted run; starting afresh (pass --resume to continue it)")
    try:
        result = train_epochs(prepared, options, run, device, reporter, validation, state)
    except KeyboardInterrupt as interrupt:
        if state is not None and state.path.exists():  # what the CLI's one line says
            interrupt.irank_note = (f"{output} was not written; {state.path} holds the last finished epoch: "
                                    "pass --resume to continue")
        raise
    provenance = {
        "manifest": {"path": manifest, "sha256": manifest_sha256, "rows": len(prepared.manifest)},
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
) -> RefineResult:
    """Fine-tune `checkpoint` on `manifest` (the head only, or the whole network) and write `output`.

    With `val`, accuracy on that manifest is measured after every epoch and the best epoch is kept.
    The state after every epoch is saved to `output + '.resume'`; with `resume` an interrupted run
    continues from it and ends with the weights an uninterrupted run would have written (`resume="auto"`:
    a state saved with other inputs or options is discarded instead of refused).
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
