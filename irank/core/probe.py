"""A regularized linear decision boundary refit on a layer's features, and scores read off it.

A network that memorized its noisy labels bent its own head around them; an L2-regularized linear
probe refit on features from earlier in the network cannot bend that far, so on it the mislabeled
samples stand out. Pure tensor functions: features and labels in, scores out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irank.core import influence
from irank.core.joint import joint_loss
from irank.core.linear import fit_standardized, fit_with_scaling, standardize
from irank.core.methods import PROBE_MEASURES
from irank.core.protocols import IN_MEMORY, Budget, Shard


def probe_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 budget: Budget | None = None) -> torch.Tensor:
    """features @ Wᵀ + b in float64, a chunk of rows at a time (no float64 copy of the features); with a
    `budget`, on disk past it."""
    logits = (budget or IN_MEMORY).array(len(features), weight.shape[0], dtype=torch.float64)
    for start, end in influence.spans(len(features), influence.chunk_size(features.shape[1])):
        logits.index_copy_(0, torch.arange(start, end), torch.addmm(bias, features[start:end].double(), weight.T))
    return logits


def probe_curvature(rows: int, num_classes: int, dims: int) -> str:
    """How a probe's influence inverts its curvature: exact while small enough, else Kronecker-factored."""
    return influence.choose_curvature("auto", rows, num_classes, dims)


def probe_scores(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    measure: str = "loss",
    shard: Shard | None = None,
    budget: Budget | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Fit the probe on (features, labels) and score every sample: (scores, probe logits, (weight, bias)).
    `device`: where the fit may run (`linear.fit_device`); everything else, and what is returned, is on the CPU.

    `loss` and `margin` are the probe's own in-sample cross-entropy and negative margin; the influence
    measures use the probe's exact curvature (Gauss–Newton + the L2 term) on standardized features.
    With a `shard` (torchrun) the rows are this process's; the probe and curvature are every process's.
    """
    if measure not in PROBE_MEASURES:
        raise ValueError(f"unknown probe measure {measure!r}; choose from {', '.join(PROBE_MEASURES)}")
    weight, bias, (mean, scale) = fit_with_scaling(features, labels, num_classes, l2=l2, shard=shard, device=device)
    logits = probe_logits(features, weight, bias, budget)
    if measure == "loss":
        scores = influence.cross_entropy(logits, labels)
    elif measure == "margin":
        scores = influence.negative_margin(logits, labels)
    else:
        def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:  # a chunk, standardized as the fit saw it
            standardized = influence.augment((features[start:end].double() - mean) / scale, has_bias=True)
            return torch.softmax(logits[start:end], dim=1), standardized

        count, dims = len(features), features.shape[1] + 1
        rows = count if shard is None else shard.total
        # either way the curvature of the probe's own objective: its Gauss–Newton matrix plus its L2 term
        compute = influence.exact_influence_of if probe_curvature(rows, num_classes, dims) == "exact" else \
            influence.kfac_influence_of
        scores = compute(read, count, labels, num_classes, dims, damping=l2, measure=measure, absolute_damping=True,
                         shard=shard)
    return scores, logits, (weight, bias)


def heldout_probe_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, l2: float,
                       folds: int = 3, seed: int = 0,
                       init: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """Mean cross-entropy of k-fold probes on their held-out folds, against the given labels.

    Needs no clean labels: a layer whose features keep the class structure predicts the given labels
    of unseen samples best, even when some of those labels are wrong. The features are standardized
    once over all rows (unsupervised statistics); `init`, a fit on all of them in those coordinates,
    starts every fold's fit closer to its optimum. The fits run on the features' device.
    """
    standardized = standardize(features).to(features.dtype if features.is_floating_point() else torch.float64)
    generator = torch.Generator().manual_seed(seed)
    fold_of = (torch.randperm(len(labels), generator=generator) % folds).to(standardized.device)
    labels = labels.to(standardized.device)
    total = 0.0
    for fold in range(folds):
        held = fold_of == fold
        weight, bias = fit_standardized(standardized[~held], labels[~held], num_classes, l2=l2, init=init)
        total += float(F.cross_entropy(standardized[held] @ weight.T + bias, labels[held], reduction="sum"))
    return total / len(labels)


def refit_scores(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, method: str, measure: str,
                 l2: float, shard: Shard | None = None, budget: Budget | None = None,
                 device: torch.device | None = None,
                 head_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, probe logits) of every sample on an L2 probe refit on `features` (this process's rows, with a
    `shard`, on the probe fitted to every process's rows); the logits go to disk past the `budget`. `device`:
    where the probe's fit may run (`linear.fit_device`). `joint-loss` needs the checkpoint's own `head_logits` of
    the same rows: the probe's loss and the head's, their ranks averaged (`irank.core.joint`)."""
    if method == "joint-loss":
        if head_logits is None:
            raise ValueError("the joint loss needs the head's logits")
        scores, logits = refit_scores(features, labels, num_classes, method="loss", measure=measure, l2=l2,
                                      shard=shard, budget=budget, device=device)
        return joint_loss(scores, influence.cross_entropy(head_logits, labels), shard), logits
    if method == "influence":
        scores, logits, _ = probe_scores(features, labels, num_classes, l2=l2, measure=measure, shard=shard,
                                         budget=budget, device=device)
        return scores, logits
    probe_measure = {"loss": "loss", "margin": "margin"}.get(method)
    if probe_measure:
        scores, logits, _ = probe_scores(features, labels, num_classes, l2=l2, measure=probe_measure, shard=shard,
                                         budget=budget, device=device)
        return scores, logits
    weight, bias, (mean, scale) = fit_with_scaling(features, labels, num_classes, l2=l2, shard=shard, device=device)
    logits = probe_logits(features, weight, bias, budget)

    def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:  # a chunk, standardized as the fit saw it
        return (torch.softmax(logits[start:end], dim=1),
                influence.augment((features[start:end].double() - mean) / scale, has_bias=True))

    return influence.gradient_norm_of(read, len(features), labels, num_classes + features.shape[1]), logits
