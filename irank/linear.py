"""Convex fits of a linear softmax classifier on fixed features: pure tensor functions.

Used to refit a head from scratch on frozen features (`refine --scope refit`): the fit is the
global optimum of mean cross-entropy + l2/2 ‖W‖², so it is deterministic and cannot bend
around a few samples the way a memorizing network does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def standardizer(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) per feature, so that L2 strength means the same on any layer's features."""
    mean = features.mean(0)
    scale = features.std(0).clamp_min(1e-6)
    return mean, scale


def fit_softmax_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    max_iter: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of mean CE(W x + b, y) + l2/2 ‖W‖², by L-BFGS on standardized features.

    Returns (weight, bias) that act on the *raw* features (the standardization is folded in).
    """
    features = features.double()
    mean, scale = standardizer(features)
    standardized = (features - mean) / scale
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(standardized @ weight.T + bias, labels) + 0.5 * l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    raw_weight = weight.detach() / scale
    raw_bias = bias.detach() - raw_weight @ mean
    return raw_weight, raw_bias
