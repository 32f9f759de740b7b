"""Convex fits of a linear softmax classifier on fixed features: pure tensor functions.

Used to refit a head from scratch on frozen features (`refine --scope refit`): the fit is the
global optimum of mean cross-entropy + l2/2 ‖W‖², so it is deterministic and cannot bend
around a few samples the way a memorizing network does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from irank.core.influence import chunk_size, spans
from irank.core.lbfgs import minimize
from irank.core.protocols import Shard

TOLERANCE_GRAD = 1e-7  # on the largest entry of the gradient: far below what moves a ranking


def standardizer(features: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, scale) per feature in float64, so that L2 strength means the same on any layer's features.

    Read in chunks of rows: no float64 copy of all rows is made. With a `shard` (torchrun) the rows
    given are this process's; the statistics are every process's rows'.
    """
    count = len(features)
    total = count if shard is None else shard.total
    step = chunk_size(features.shape[1])
    device = features.device if isinstance(features, torch.Tensor) else None  # DiskRows: the CPU
    local_sum = sum((features[start:end].double().sum(0) for start, end in spans(count, step)),
                    torch.zeros(features.shape[1], dtype=torch.float64, device=device))
    mean = (local_sum if shard is None else shard.sum(local_sum)) / total
    local_squares = sum((((features[start:end].double() - mean) ** 2).sum(0) for start, end in spans(count, step)),
                        torch.zeros(features.shape[1], dtype=torch.float64, device=device))
    squares = local_squares if shard is None else shard.sum(local_squares)
    return mean, (squares / max(1, total - 1)).sqrt().clamp_min(1e-6)


def standardize(features: torch.Tensor) -> torch.Tensor:
    """Features in float64, centred and scaled per feature (statistics of these rows; no labels involved)."""
    mean, scale = standardizer(features)
    return (features.double() - mean) / scale


def data_term(data: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              scaling: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ_i CE(W z_i + b, y_i) and its gradients (Σ r_i z_iᵀ, Σ r_i with r = softmax − onehot), over the rows
    of `data` in chunks. With `scaling` = (mean, scale), z = (x − mean) / scale is formed chunk by chunk
    in the weights' dtype, so a fit on raw float32 features never holds a float64 copy of them."""
    loss = torch.zeros((), dtype=weight.dtype, device=weight.device)
    weight_grad, bias_grad = torch.zeros_like(weight), torch.zeros_like(bias)
    # chunks of 2^19 numbers, but at least 8,192 rows: a fit evaluates this hundreds of times
    for start, end in spans(len(data), max(8192, chunk_size(data.shape[1] + weight.shape[0], budget=1 << 19))):
        chunk = data[start:end].to(weight.dtype)
        if scaling is not None:
            chunk = (chunk - scaling[0]) / scaling[1]
        chunk_labels = labels[start:end]
        logits = torch.addmm(bias, chunk, weight.T)
        log_norm = torch.logsumexp(logits, dim=1)
        loss += (log_norm - logits.gather(1, chunk_labels[:, None]).squeeze(1)).sum()
        residual = torch.exp(logits - log_norm[:, None])
        residual[torch.arange(end - start, device=residual.device), chunk_labels] -= 1
        weight_grad += residual.T @ chunk
        bias_grad += residual.sum(0)
    return loss, weight_grad, bias_grad


def _packed(weight_shape: torch.Size, point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) as views of one flat parameter vector."""
    size = weight_shape[0] * weight_shape[1]
    return point[:size].view(weight_shape), point[size:]


def _objective(weight_shape: torch.Size, num_rows: int, l2: float,
               summed: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """The flat objective mean CE + l2/2 ‖W‖² and its gradient, from `summed(weight, bias)`: the data term's
    sums (loss, ∂/∂weight, ∂/∂bias) over the rows."""
    def objective(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = _packed(weight_shape, point)
        loss, weight_grad, bias_grad = summed(weight, bias)
        gradient = torch.cat([(weight_grad / num_rows + l2 * weight).reshape(-1), bias_grad / num_rows])
        return loss / num_rows + 0.5 * l2 * (weight * weight).sum(), gradient
    return objective


def fit_standardized(
    standardized: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
    scaling: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of mean CE(W z + b, y) + l2/2 ‖W‖² on standardized features, in their dtype
    (or, with `scaling`, on raw features standardized chunk by chunk, in float64), on their device.

    The objective is strictly convex, so `init` (e.g. the fit on a superset of the rows) only saves
    iterations. The gradient tolerance (1e-7 on the largest entry) is far below what moves a ranking.
    The gradient is written out instead of taken by autograd: autograd's bookkeeping was a third of
    the time of these small fits.
    """
    num_rows, dims = standardized.shape
    dtype = torch.float64 if scaling is not None else standardized.dtype
    device = standardized.device if isinstance(standardized, torch.Tensor) else torch.device("cpu")
    if init is None:
        start = torch.zeros(num_classes * (dims + 1), dtype=dtype, device=device)
    else:
        start = torch.cat([init[0].reshape(-1), init[1]]).to(device, dtype)
    shape = torch.Size((num_classes, dims))
    objective = _objective(shape, num_rows, l2, lambda weight, bias: data_term(standardized, labels, weight, bias,
                                                                              scaling))
    with torch.no_grad():
        point = minimize(objective, start, max_iter=max_iter, tolerance_grad=TOLERANCE_GRAD).point
    return _packed(shape, point)


def fit_softmax_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    max_iter: int = 500,
    shard: Shard | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over (W, b) of mean CE(W x + b, y) + l2/2 ‖W‖², by L-BFGS on standardized features.

    Returns (weight, bias) that act on the *raw* features (the standardization is folded in). With a
    `shard` (torchrun) the rows given are this process's, the fit is over every process's rows, and
    every process returns the same weights (see `_step_sharded`). `device`: where it may run (`fit_device`).
    """
    weight, bias, _ = fit_with_scaling(features, labels, num_classes, l2=l2, max_iter=max_iter, shard=shard,
                                       device=device)
    return weight, bias


# A fit evaluates its objective hundreds of times. Up to this size the rows are standardized once, into a
# float64 copy, instead of chunk by chunk on every evaluation: the same numbers, bit for bit, and 5× faster
# on 10,000 × 256 features. Larger sets (or rows on disk, past --memory-budget) keep the chunked path.
PRESTANDARDIZE_BYTES = 256 << 20


def fit_rows(features: torch.Tensor, scaling: tuple[torch.Tensor, torch.Tensor]):
    """(rows, scaling) for `data_term`: the standardized float64 copy and no scaling when it fits in
    PRESTANDARDIZE_BYTES, else the rows as given with the scaling to apply chunk by chunk."""
    if isinstance(features, torch.Tensor) and features.numel() * 8 <= PRESTANDARDIZE_BYTES:
        mean, scale = scaling
        return (features.double() - mean) / scale, None
    return features, scaling


def fit_device(rows: torch.Tensor, device: torch.device | None) -> torch.device:
    """Where a fit on `rows` runs: on a CUDA `device` when the rows are in memory and take at most a quarter of
    its free memory (a fit reads every row hundreds of times), else on the CPU. On the GPU the sums are taken
    in another order, so the fit can differ from the CPU's in its last digits (the CUDA tests bound it)."""
    if device is None or device.type != "cuda" or not isinstance(rows, torch.Tensor):
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if rows.numel() * rows.element_size() * 4 <= free else torch.device("cpu")


def fit_with_scaling(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float,
    max_iter: int = 500,
    shard: Shard | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`fit_softmax_regression`, also returning the (mean, scale) it standardized with, for callers that
    work in the fit's standardized coordinates (the probe's curvature) without a second pass over the rows.

    `device`: where the fit runs (see `fit_device`); the results are on the CPU whatever it is."""
    scaling = standardizer(features, shard)
    rows, row_scaling = fit_rows(features, scaling)
    if shard is None:
        where = fit_device(rows, device)
        if where.type != "cpu":
            rows, labels = rows.to(where), labels.to(where)
            row_scaling = None if row_scaling is None else tuple(part.to(where) for part in row_scaling)
        weight, bias = fit_standardized(rows, labels, num_classes, l2=l2, max_iter=max_iter, scaling=row_scaling)
        weight, bias = weight.cpu(), bias.cpu()
    else:
        weight, bias = _fit_sharded(rows, row_scaling, labels, num_classes, l2, max_iter, shard)
    del rows
    mean, scale = scaling
    raw_weight = weight / scale
    raw_bias = bias - raw_weight @ mean
    return raw_weight, raw_bias, scaling


def _fit_sharded(features: torch.Tensor, scaling: tuple[torch.Tensor, torch.Tensor] | None, labels: torch.Tensor,
                 num_classes: int, l2: float, max_iter: int, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit over every process's rows: rank 0 alone runs L-BFGS. Each time it evaluates the objective it
    sends the point to every process, and each returns its rows' share of the loss and gradient
    (all-reduced). Only rank 0 decides, so the processes cannot fall out of step; at the end it sends the
    final point, so every process holds the same weights."""
    shape = torch.Size((num_classes, features.shape[1]))
    point = torch.zeros(num_classes * (shape[1] + 1), dtype=torch.float64)

    def exchange(go: bool) -> bool:
        """Rank 0's (go, point) on every process; returns go."""
        message = torch.cat([torch.tensor([float(go)], dtype=point.dtype), point])
        shard.broadcast_(message)
        point.copy_(message[1:])
        return bool(message[0])

    def summed(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every process's rows' sums of the data term at (weight, bias)."""
        loss, weight_grad, bias_grad = data_term(features, labels, weight, bias, scaling)
        total = shard.sum(torch.cat([loss.reshape(1), weight_grad.reshape(-1), bias_grad.reshape(-1)]))
        return total[0], total[1 : 1 + shape.numel()].view(shape), total[1 + shape.numel():]

    with torch.no_grad():
        if not shard.leads:
            while exchange(go=False):
                summed(*_packed(shape, point))
            return _packed(shape, point)
        local = _objective(shape, shard.total, l2, summed)

        def objective(candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            point.copy_(candidate)
            exchange(go=True)
            return local(point)

        point.copy_(minimize(objective, point.clone(), max_iter=max_iter, tolerance_grad=TOLERANCE_GRAD).point)
        exchange(go=False)
    return _packed(shape, point)
