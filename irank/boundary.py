"""Which decision boundary to measure influence on: the checkpoint's own head, or a regularized linear
probe refit on a chosen layer's features (`--boundary refit --layer NAME|auto --l2 L`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import influence
from .errors import UsageError
from .linear import standardizer
from .probe import heldout_probe_loss, probe_scores
from .progress import Reporter

BOUNDARIES = ("head", "refit")
# Modules that only reshape or gate what flows through them are never a layer worth probing on their own.
PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Dropout, nn.Identity, nn.Flatten, nn.BatchNorm2d, nn.BatchNorm1d)
MAX_AUTO_CANDIDATES = 5


@dataclass
class BoundaryOptions:
    kind: str = "head"
    layer: str | None = None  # a module name, or "auto"; None = the head's input (refit only)
    l2: float = 1e-2

    def validate(self) -> None:
        if self.kind not in BOUNDARIES:
            raise UsageError(f"--boundary {self.kind}: choose from {', '.join(BOUNDARIES)}")
        if not self.l2 > 0:
            raise UsageError(f"--l2 {self.l2}: must be positive")
        if self.kind == "head" and self.layer:
            raise UsageError("--layer needs --boundary refit (the head boundary is read at the head)")


def block_candidates(model: nn.Module, head_name: str) -> list[str]:
    """The blocks of a network, shallow to deep: direct children, or the children of a direct child that
    is a Sequential/ModuleList (e.g. `features.3`), without pass-through modules and the head. The last
    MAX_AUTO_CANDIDATES are kept: early blocks carry too little class structure to probe."""
    names = []
    for child_name, child in model.named_children():
        if child_name == head_name:
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            names += [f"{child_name}.{sub}" for sub, module in child.named_children() if not isinstance(module, PASS_THROUGH)]
        elif not isinstance(child, PASS_THROUGH):
            names.append(child_name)
    return names[-MAX_AUTO_CANDIDATES:]


@dataclass
class LayerChoice:
    layer: str
    how: str
    figures: dict[str, dict] = field(default_factory=dict)  # layer → {dims, heldout_loss}


def choose_layer(features: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, *, l2: float,
                 reporter: Reporter | None = None) -> LayerChoice:
    """The layer whose probe best predicts the given labels of held-out samples (3-fold cross-entropy)."""
    reporter = reporter or Reporter()
    figures = {}
    for name, values in features.items():
        figures[name] = {"dims": int(values.shape[1]), "heldout_loss": heldout_probe_loss(values, labels, num_classes, l2=l2)}
        reporter.info(f"layer {name}: {values.shape[1]} features, held-out probe loss {figures[name]['heldout_loss']:.4f}")
    best = min(figures, key=lambda name: (figures[name]["heldout_loss"], name))
    return LayerChoice(best, "lowest 3-fold held-out probe loss on the given labels", figures)


def refit_scores(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, method: str, measure: str,
                 l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, probe logits) of every sample on an L2 probe refit on `features`."""
    if method == "influence":
        scores, logits, _ = probe_scores(features, labels, num_classes, l2=l2, measure=measure)
        return scores, logits
    probe_measure = {"loss": "loss", "margin": "margin"}.get(method)
    if probe_measure:
        scores, logits, _ = probe_scores(features, labels, num_classes, l2=l2, measure=probe_measure)
        return scores, logits
    _, logits, _ = probe_scores(features, labels, num_classes, l2=l2, measure="loss")
    mean, scale = standardizer(features.double())
    return influence.gradient_norm(logits, (features.double() - mean) / scale, labels), logits
