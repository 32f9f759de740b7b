"""Convex fits of a linear softmax classifier on fixed features: pure tensor functions.

Used to refit a head from scratch on frozen features (`refine --scope refit`): the fit is the
global optimum of mean cross-entropy + l2/2 ‖W‖², so it is deterministic and cannot bend
around a few samples the way a memorizing network does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import Shard, broadcast_, is_main


def standardizer(features: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) per feature, so that L2 strength means the same on any layer's features.

    With a `shard` (torchrun) the rows given are this process's; the statistics are every process's rows'.
    """
    if shard is not None:
        mean = shard.mean(features)
        variance = shard.sum(((features - mean) ** 2).sum(0)) / (shard.total - 1)
        return mean, variance.sqrt().clamp_min(1e-6)
    mean = features.mean(0)
    scale = features.std(0).clamp_min(1e-6)
    return mean, scale


def standardize(features: torch.Tensor) -> torch.Tensor:
    """Features in float64, centred and scaled per feature (statistics of these rows; no labels involved)."""
    features = features.double()
    mean, scale = standardizer(features)
    return (features - mean) / scale


def fit_standardized(
    standardized: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of mean CE(W z + b, y) + l2/2 ‖W‖² on already standardized features, in their dtype.

    The objective is strictly convex, so `init` (e.g. the fit on a superset of the rows) only saves
    iterations. The gradient tolerance (1e-7 on the largest entry) is far below what moves a ranking.
    The gradient is written out, (softmax − onehot)ᵀ Z / n + l2 W, instead of taken by autograd: the
    fits are small and autograd's bookkeeping was a third of their time.
    """
    num_rows, dims = standardized.shape
    dtype = standardized.dtype
    if init is None:
        weight = torch.zeros(num_classes, dims, dtype=dtype)
        bias = torch.zeros(num_classes, dtype=dtype)
    else:
        weight, bias = (tensor.detach().clone().to(dtype) for tensor in init)
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    onehot = F.one_hot(labels, num_classes).to(dtype)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        logits = torch.addmm(bias, standardized, weight.T)
        log_norm = torch.logsumexp(logits, dim=1)
        loss = (log_norm - (logits * onehot).sum(1)).mean() + 0.5 * l2 * (weight * weight).sum()
        residual = (torch.exp(logits - log_norm[:, None]) - onehot) / num_rows
        weight.grad.copy_(residual.T @ standardized).add_(weight, alpha=l2)
        bias.grad.copy_(residual.sum(0))
        return loss

    with torch.no_grad():
        optimizer.step(closure)
    return weight, bias


def fit_softmax_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    max_iter: int = 500,
    shard: Shard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of mean CE(W x + b, y) + l2/2 ‖W‖², by L-BFGS on standardized features.

    Returns (weight, bias) that act on the *raw* features (the standardization is folded in). With a
    `shard` (torchrun) the rows given are this process's, the fit is over every process's rows, and
    every process returns the same weights (see `_step_sharded`).
    """
    features = features.double()
    mean, scale = standardizer(features, shard)
    standardized = (features - mean) / scale
    if shard is None:
        weight, bias = fit_standardized(standardized, labels, num_classes, l2=l2, max_iter=max_iter)
    else:
        weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                      tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe")
        _step_sharded(optimizer, weight, bias, standardized, labels, l2, shard)
        weight, bias = weight.detach(), bias.detach()
    raw_weight = weight / scale
    raw_bias = bias - raw_weight @ mean
    return raw_weight, raw_bias


def _step_sharded(optimizer: torch.optim.LBFGS, weight: torch.Tensor, bias: torch.Tensor, standardized: torch.Tensor,
                  labels: torch.Tensor, l2: float, shard: Shard) -> None:
    """`optimizer.step` over every process's rows: rank 0 alone runs L-BFGS. Each time it evaluates the
    objective it sends the point to every process, and each returns its rows' share of the loss and
    gradient (all-reduced). Only rank 0 decides, so the processes cannot fall out of step; at the end it
    sends the final point, so every process holds the same weights."""
    sizes = (weight.numel(), bias.numel())

    def exchange(go: bool) -> bool:
        """Rank 0's (go, weight, bias) on every process; returns go."""
        message = torch.cat([torch.tensor([float(go)], dtype=weight.dtype), weight.detach().reshape(-1),
                             bias.detach().reshape(-1)])
        broadcast_(message)
        with torch.no_grad():
            weight.copy_(message[1 : 1 + sizes[0]].view_as(weight))
            bias.copy_(message[1 + sizes[0] :].view_as(bias))
        return bool(message[0])

    def data_term() -> torch.Tensor:
        """[loss, ∂loss/∂weight, ∂loss/∂bias] of every process's rows at the current point, flattened."""
        weight.grad, bias.grad = None, None
        with torch.enable_grad():
            loss = F.cross_entropy(standardized @ weight.T + bias, labels, reduction="sum") / shard.total
            loss.backward()
        return shard.sum(torch.cat([loss.detach().reshape(1), weight.grad.reshape(-1), bias.grad.reshape(-1)]))

    if not is_main():
        while exchange(go=False):
            data_term()
        return

    def closure():
        optimizer.zero_grad()
        exchange(go=True)
        totals = data_term()
        weight.grad = totals[1 : 1 + sizes[0]].view_as(weight).clone()
        bias.grad = totals[1 + sizes[0] :].view_as(bias).clone()
        penalty = 0.5 * l2 * (weight**2).sum()
        penalty.backward()
        return totals[0] + penalty.detach()

    optimizer.step(closure)
    exchange(go=False)
