"""Training recipes of the bases, and the plain PyTorch loop that runs them.

Users' checkpoints come from their own loops, not from `irank train`, so the bases do too: a standalone
loop over images preloaded as one uint8 tensor (no JPEG decoding per epoch), augmentation on tensors.
The same loop trains the auxiliary model of the human-like noise, cleanlab's cross-validation folds
(each fold: the base's own recipe from scratch) and the fine-tune whose margins give AUM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import torchvision
from common import PREPROCESS
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

# irank's built-in architectures; irank's internal modules are being reorganized, so this import may move
from irank.model.architectures import BUILTIN_ARCHS

MEAN = torch.tensor(PREPROCESS["mean"]).view(1, 3, 1, 1)
STD = torch.tensor(PREPROCESS["std"]).view(1, 3, 1, 1)
GCE_Q = 0.7  # the q of generalized cross-entropy (Zhang & Sabuncu 2018), their recommended value


@dataclass(frozen=True)
class Recipe:
    """How one base is trained: SGD with Nesterov momentum, batch 128, 30 epochs unless said otherwise."""

    arch: str = "small-cnn"
    epochs: int = 30
    lr: float = 0.1  # the peak of one-cycle, the start of cosine
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "onecycle"  # onecycle | cosine
    augment: bool = True  # random crops (4 px reflect padding) and horizontal flips
    loss: str = "ce"  # ce | gce
    label_smoothing: float = 0.0
    mixup: float = 0.0  # alpha of Beta(alpha, alpha); 0: no mixup
    select: str = "last"  # last | best-val: keep the epoch with the best accuracy on the clean val set

    def to_dict(self) -> dict:
        return asdict(self)


PLAIN = Recipe(lr=0.05, schedule="cosine", augment=False)
AUG = Recipe()
RECIPES = {
    "plain-sgd": PLAIN,  # no augmentation: memorizes every label
    "aug-onecycle": AUG,  # crops, flips, one-cycle: the way most people train
    "aug-cosine": replace(AUG, lr=0.05, schedule="cosine"),
    "early-stopped": replace(PLAIN, select="best-val"),
    "label-smoothing": replace(AUG, label_smoothing=0.1),
    "mixup": replace(AUG, mixup=1.0),
    "strong-wd": replace(AUG, weight_decay=5e-3),
    "gce": replace(AUG, loss="gce"),
    "resnet18": replace(AUG, arch="resnet18"),  # torchvision's resnet18, as is, on 32×32 inputs
}


def build_model(arch: str, num_classes: int = 10) -> nn.Module:
    """irank's built-in name or a torchvision model name, built the way irank builds it from metadata."""
    if arch in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[arch](num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def load_base(path) -> tuple[nn.Module, dict]:
    """A checkpoint written by bases.py (safetensors with irank metadata) as an eval-mode model."""
    import json

    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["irank"])
    model = build_model(metadata["arch"], len(metadata["classes"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), metadata


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×32×32 → the float tensor irank's cifar10 preset gives (ToTensor, then Normalize)."""
    return (images.float() / 255 - MEAN) / STD


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32×32 crops of the 4-pixel reflect-padded images, and horizontal flips, on a float batch."""
    n, _, height, width = images.shape
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(height)).view(n, 1, height, 1).expand(n, 3, height, width + 8)
    cropped = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(width)).view(n, 1, 1, width).expand(n, 3, height, width)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), cropped.flip(3), cropped)


def sample_loss(logits: torch.Tensor, labels: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Per-sample loss of the recipe: cross-entropy (with its label smoothing) or GCE."""
    if recipe.loss == "gce":
        given = F.softmax(logits, 1).gather(1, labels.view(-1, 1)).squeeze(1).clamp_min(1e-7)
        return (1 - given**GCE_Q) / GCE_Q
    return F.cross_entropy(logits, labels, reduction="none", label_smoothing=recipe.label_smoothing)


def batch_loss(model, images, labels, recipe: Recipe, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, logits) of one batch, with mixup when the recipe asks for it."""
    if recipe.mixup <= 0:
        logits = model(images)
        return sample_loss(logits, labels, recipe).mean(), logits
    mix = float(torch.distributions.Beta(recipe.mixup, recipe.mixup).sample())
    partner = torch.randperm(len(images), generator=generator)
    logits = model(mix * images + (1 - mix) * images[partner])
    loss = mix * sample_loss(logits, labels, recipe) + (1 - mix) * sample_loss(logits, labels[partner], recipe)
    return loss.mean(), logits


def make_schedule(optimizer, recipe: Recipe, steps: int):
    """The recipe's learning-rate schedule, stepped once a batch: one-cycle, or cosine to zero."""
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of uint8 images (no augmentation), in eval mode."""
    model.eval()
    return torch.cat([model(normalize(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images).argmax(1) == labels).float().mean())


OnBatch = Callable[[int, torch.Tensor, torch.Tensor], None]  # (epoch, row indices, logits)


def run_epoch(model, optimizer, schedule, images, labels, recipe: Recipe, generator, epoch: int,
              on_batch: OnBatch | None) -> float:
    """One pass over the rows in a seeded order; the mean training loss."""
    model.train()
    order = torch.randperm(len(images), generator=generator)
    total = 0.0
    for start in range(0, len(order), recipe.batch_size):
        rows = order[start:start + recipe.batch_size]
        batch = normalize(images[rows])
        if recipe.augment:
            batch = augment(batch, generator)
        loss, logits = batch_loss(model, batch, labels[rows], recipe, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += float(loss.detach()) * len(rows)
        if on_batch is not None:
            on_batch(epoch, rows, logits.detach())
    return total / len(order)


def fit(recipe: Recipe, images: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, model: nn.Module | None = None,
        val: tuple[torch.Tensor, torch.Tensor] | None = None, on_batch: OnBatch | None = None,
        log: Callable[[str], None] = print) -> tuple[nn.Module, list[dict]]:
    """Train (or, given `model`, fine-tune) with the recipe; the model in eval mode and one record per epoch.

    With `select="best-val"` the returned weights are those of the epoch with the best val accuracy.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = model if model is not None else build_model(recipe.arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                                weight_decay=recipe.weight_decay)
    schedule = make_schedule(optimizer, recipe, recipe.epochs * math.ceil(len(images) / recipe.batch_size))
    history, best = [], (-1.0, None)
    for epoch in range(recipe.epochs):
        started = time.perf_counter()
        loss = run_epoch(model, optimizer, schedule, images, labels, recipe, generator, epoch, on_batch)
        record = {"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - started}
        if val is not None:
            record["val_accuracy"] = accuracy(model, *val)
            if record["val_accuracy"] > best[0]:
                best = (record["val_accuracy"], {k: v.clone() for k, v in model.state_dict().items()})
        history.append(record)
        log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    if recipe.select == "best-val":
        model.load_state_dict(best[1])
    return model.eval(), history
