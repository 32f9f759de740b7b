"""Training loops: fine-tune a prepared model by SGD (its head, or the whole network), epoch by epoch.

`train_epochs` runs the epochs. Where a batch comes from, and how its loss is computed, is one of three
batch sources, chosen once by `batch_source`:

- `CachedHead`: --scope head without augmentation: the head's inputs are computed once and the head trains on
  them; under torchrun each process holds a block of them, every batch of the one-process run is split by which
  process holds its rows and the gradients are summed, so it computes what one process computes;
- `Images`: everything else: batches read (and augmented) from the manifest through the network; under torchrun
  DistributedDataParallel on `ShardedShuffle`'s share of each epoch.

With a `Resume`, the state after every epoch is saved, and a saved state is continued from: the weights come out
as if training had never stopped. --scope refit is not a loop: see irank.model.refit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from irank.formats.resume import Resume, TrainingState, pack_optimizer, prefixed, unpack_optimizer, unprefixed
from irank.model.forward import forward_pass
from irank.model.inputs import ShardedShuffle, batches, make_loader, make_shard_loader, resolve_augment
from irank.model.margin_log import MarginLog
from irank.model.placement import Placement
from irank.model.prepare import Prepared
from irank.options import RunOptions, TrainOptions
from irank.runtime.distributed import (
    Shard,
    all_or_none,
    all_reduce_sum,
    broadcast_,
    ddp_device_ids,
    each_all_or_none,
    rank,
    shard_of,
    world_size,
)
from irank.runtime.progress import Reporter

GCE_Q = 0.7


@dataclass
class RefineResult:
    history: list[dict] = field(default_factory=list)  # per epoch: train loss, val accuracy
    best_epoch: int = 0
    metadata: dict = field(default_factory=dict)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, reduction: str = "mean") -> torch.Tensor:
    """Mean (or with reduction="sum", summed) cross-entropy, or generalized cross-entropy (1 − p_y^q) / q,
    which bounds a wrong label's pull."""
    if kind == "gce":
        label_prob = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1).clamp_min(1e-7)
        losses = (1 - label_prob**GCE_Q) / GCE_Q
        return losses.sum() if reduction == "sum" else losses.mean()
    return F.cross_entropy(logits, labels, reduction=reduction)


def cosine(step: int, total: int) -> float:
    """The learning rate's share at `step` of `total` on a cosine schedule from 1 to 0."""
    return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def sum_gradients(parameters: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Replace each parameter's gradient by its sum over every process (torchrun); returns the summed loss."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    summed = all_reduce_sum(torch.cat([loss.detach().reshape(1)] + [g.reshape(-1) for g in grads]))
    offset = 1
    for parameter in parameters:
        parameter.grad = summed[offset : offset + parameter.numel()].view_as(parameter).clone()
        offset += parameter.numel()
    return summed[0]


class Source:
    """What both batch sources share: a batch's given labels, and every step's margins logged where asked."""

    labels: torch.Tensor
    margins: MarginLog | None = None

    def _labels(self, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        labels = self.labels[rows].to(logits.device)
        if self.margins is not None:
            self.margins.add(rows, logits, labels)
        return labels


class CachedHead(Source):
    """The head trained on its inputs, computed once (--scope head, no augmentation)."""

    cached = True

    def __init__(self, prepared: Prepared, run: RunOptions, place: Placement, reporter: Reporter, shard: Shard | None,
                 loss_kind: str, generator: torch.Generator):
        with all_or_none():
            plain, num_rows, first_row = make_shard_loader(prepared.manifest.resolved_paths(), prepared.preprocess,
                                                           batch_size=run.batch_size, num_workers=run.num_workers,
                                                           shard=shard)
            self.head_inputs = forward_pass(prepared.model, prepared.head, plain, num_rows=num_rows, device=place,
                                            reporter=reporter, description="head inputs", first_row=first_row).head_inputs
        self.head, self.device, self.shard, self.loss_kind = prepared.head, place.device, shard, loss_kind
        self.labels = torch.from_numpy(prepared.labels)
        self.batch_size, self.generator = run.batch_size, generator
        self.steps_per_epoch = math.ceil(len(self.labels) / run.batch_size)

    def chunks(self):
        order = torch.randperm(len(self.labels), generator=self.generator)
        return [(None, order[i : i + self.batch_size]) for i in range(0, len(self.labels), self.batch_size)]

    def loss(self, images, rows: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            logits = self.head(self.head_inputs[rows].to(self.device))
            return training_loss(logits, self._labels(rows, logits), self.loss_kind)
        # this process's rows of the batch, their loss over the whole batch
        here = rows[(rows >= self.shard.start) & (rows < self.shard.stop)]
        logits = self.head(self.head_inputs[here - self.shard.start].to(self.device))
        return training_loss(logits, self._labels(here, logits), self.loss_kind, reduction="sum") / len(rows)

    def after_backward(self, loss: torch.Tensor, trainable: list[torch.Tensor]) -> torch.Tensor:
        return loss if self.shard is None else sum_gradients(trainable, loss)

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {}

    def set_rng_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def epoch_totals(self, running: float, seen: int, model) -> tuple[float, int]:
        return running, seen


class Images(Source):
    """Batches read, and augmented, from the manifest through the network; DistributedDataParallel under torchrun."""

    cached = False

    def __init__(self, prepared: Prepared, run: RunOptions, place: Placement, shard: Shard | None, options: TrainOptions,
                 model):
        paths, labels = prepared.manifest.resolved_paths(), prepared.labels
        self.forward, self.place, self.shard, self.loss_kind = model, place, shard, options.loss
        self.labels = torch.from_numpy(labels)
        if shard is None:
            self.loader = make_loader(paths, prepared.preprocess, batch_size=run.batch_size, num_workers=run.num_workers,
                                      augment=options.augment, shuffle=True, seed=options.seed)
        else:  # each process takes its share of every epoch's order, in batches of its share of --batch-size
            order = ShardedShuffle(len(labels), seed=options.seed, index=rank(), parts=world_size())
            self.loader = make_loader(paths, prepared.preprocess, batch_size=math.ceil(run.batch_size / world_size()),
                                      num_workers=run.num_workers, augment=options.augment, sampler=order)
            # A model cut at a layer (a refit probe) leaves the modules after the cut unused.
            self.forward = DistributedDataParallel(
                model, device_ids=ddp_device_ids() if place.device.type == "cuda" else None,
                find_unused_parameters=bool(prepared.extra_metadata.get("probe")))
        self.steps_per_epoch = len(self.loader)

    def chunks(self):
        return each_all_or_none(batches(self.loader))  # a bad image in any process stops them all

    def loss(self, images, rows: torch.Tensor) -> torch.Tensor:
        with self.place.autocast():
            logits = self.forward(self.place.inputs(images)).float()
        return training_loss(logits, self._labels(rows, logits), self.loss_kind)

    def after_backward(self, loss: torch.Tensor, trainable: list[torch.Tensor]) -> torch.Tensor:
        return loss

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"rng.loader": self.loader.generator.get_state()}

    def set_rng_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.loader.generator.set_state(tensors["rng.loader"])

    def epoch_totals(self, running: float, seen: int, model) -> tuple[float, int]:
        if self.shard is None:
            return running, seen
        running, seen = (float(total) for total in all_reduce_sum(torch.tensor([running, float(seen)],
                                                                              dtype=torch.float64)))
        for buffer in model.buffers():  # batch-norm statistics: rank 0's, as DistributedDataParallel uses
            broadcast_(buffer)
        return running, seen


@dataclass
class Progress:
    """Where a run of epochs stands: what resuming restores and every epoch's end saves."""

    step: int = 0
    best_accuracy: float = -1.0
    best_state: dict | None = None
    start_epoch: int = 1


def restore(saved: TrainingState, model, optimizer, generator: torch.Generator, source, result: RefineResult) -> Progress:
    """Put a saved state back: the weights, the optimizer, every random generator, the history."""
    model.load_state_dict(unprefixed("model", saved.tensors))
    unpack_optimizer(optimizer, saved.tensors)
    torch.set_rng_state(saved.tensors["rng.torch"])
    generator.set_state(saved.tensors["rng.order"])
    source.set_rng_state(saved.tensors)
    if source.margins is not None:
        source.margins.restore(saved.tensors)
    result.history, result.best_epoch = saved.info["history"], saved.info["best_epoch"]
    return Progress(step=saved.info["step"], best_accuracy=saved.info["best_accuracy"],
                    best_state=unprefixed("best", saved.tensors) or None, start_epoch=saved.info["epoch"] + 1)


def save_state(resume: Resume, epoch: int, progress: Progress, model, optimizer, generator: torch.Generator, source,
               result: RefineResult) -> None:
    tensors = {**prefixed("model", model.state_dict()), **pack_optimizer(optimizer),
               "rng.torch": torch.get_rng_state(), "rng.order": generator.get_state(), **source.rng_state(),
               **(source.margins.state() if source.margins is not None else {})}
    if progress.best_state is not None:
        tensors.update(prefixed("best", progress.best_state))
    resume.save(TrainingState(tensors, {"epoch": epoch, "step": progress.step, "history": result.history,
                                        "best_epoch": result.best_epoch, "best_accuracy": progress.best_accuracy}))


def run_epoch(model, source, optimizer, scaler, trainable: list[torch.Tensor], options: TrainOptions,
              progress: Progress, total_steps: int, device: torch.device, advance) -> float:
    """One pass over the batches; returns the mean training loss over every process's rows."""
    # the loss is summed on the device and read once an epoch: reading it every step would make the host
    # wait for the GPU before it queues the next step
    running, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    for images, rows in source.chunks():
        for group in optimizer.param_groups:
            group["lr"] = options.lr * cosine(progress.step, total_steps)
        loss = source.loss(images, rows)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        loss = source.after_backward(loss, trainable)
        scaler.step(optimizer)
        scaler.update()
        running += loss.detach().double() * len(rows)
        seen += len(rows)
        progress.step += 1
        advance(1)
    running, seen = source.epoch_totals(float(running), seen, model)
    return running / max(1, seen)


def prepare_training(prepared: Prepared, options: TrainOptions, run: RunOptions, place: Placement,
                     reporter: Reporter):
    """The placed model with what trains in it set (the head alone, or everything), its SGD optimizer, the
    shuffling generator and the batch source."""
    shard = shard_of(len(prepared.labels))  # None with one process
    torch.manual_seed(options.seed if shard is None else options.seed + rank())  # augmentation draws differ by process
    model, head = place.place_model(prepared.model), prepared.head
    head_only = options.scope == "head"
    for parameter in model.parameters():
        parameter.requires_grad_(not head_only)
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)
    cached = head_only and resolve_augment(options.augment, prepared.manifest.resolved_paths(), prepared.preprocess) == "none"
    source = (CachedHead(prepared, run, place, reporter, shard, options.loss, generator) if cached else
              Images(prepared, run, place, shard, options, model))
    return model, trainable, optimizer, generator, source


def train_epochs(prepared: Prepared, options: TrainOptions, run: RunOptions, device: "torch.device | Placement",
                 reporter: Reporter, validation=None, resume: Resume | None = None,
                 margins: MarginLog | None = None) -> RefineResult:
    """Train for `options.epochs` by SGD with momentum on a cosine schedule; with `validation` (a
    `ValidationSet`), score every epoch and keep the best; with `margins`, log every step's margins of its rows
    there (saved and resumed with the state). See the module's docstring for the batch sources."""
    place = Placement.of(device)
    model, trainable, optimizer, generator, source = prepare_training(prepared, options, run, place, reporter)
    source.margins = margins
    if margins is not None and margins.rows is None:
        margins.rows = len(prepared.labels)
    total_steps = options.epochs * source.steps_per_epoch
    # fp16 gradients underflow without loss scaling; bf16 and full precision need none (the scaler then passes through)
    scaler = torch.amp.GradScaler(place.device.type, enabled=place.autocast_dtype == torch.float16 and not source.cached)
    result = RefineResult()
    saved = resume.load() if resume else None
    progress = restore(saved, model, optimizer, generator, source, result) if saved is not None else Progress()
    if saved is not None:
        reporter.info(f"resuming from {resume.path}: {saved.info['epoch']} of {options.epochs} epochs done")
    head_only = options.scope == "head"
    for epoch in range(progress.start_epoch, options.epochs + 1):
        model.train(not head_only)  # a frozen backbone keeps its batch-norm statistics
        with reporter.task(f"epoch {epoch}/{options.epochs}", source.steps_per_epoch) as advance:
            record = {"epoch": epoch, "train_loss": run_epoch(model, source, optimizer, scaler, trainable, options,
                                                              progress, total_steps, place.device, advance)}
        if validation is not None:
            record["val_accuracy"] = validation.accuracy(prepared, reporter, cache_head_inputs=head_only)
            if record["val_accuracy"] > progress.best_accuracy:
                progress.best_accuracy, result.best_epoch = record["val_accuracy"], epoch
                progress.best_state = copy.deepcopy(model.state_dict())
        else:
            result.best_epoch = epoch
        result.history.append(record)
        if resume is not None:
            save_state(resume, epoch, progress, model, optimizer, generator, source, result)
        reporter.info("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return result
