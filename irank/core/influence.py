"""Influence of each sample on the head's decision boundary: pure tensor functions, no I/O.

The head is `logits = W φ + b`. With p = softmax(logits), r = p − e_y and φ̃ = [φ, 1] (the 1 only if
the head has a bias), the per-sample gradient of the cross-entropy w.r.t. the head is g = r ⊗ φ̃ and
the Gauss–Newton curvature of the mean loss is H = mean_i (diag p_i − p_i p_iᵀ) ⊗ φ̃_i φ̃_iᵀ.
Leaving sample i out moves the optimum by about Δθ_i = H⁻¹ g_i / n (the influence function), and
the measures below are read off that:

- self-influence   g_iᵀ H⁻¹ g_i / n      the rise of sample i's own loss when it is left out
- boundary-shift   Δθ_iᵀ (I ⊗ B) Δθ_i    the mean squared change of all logits (B = mean φ̃ φ̃ᵀ)
- parameter-shift  ‖Δθ_i‖                how far the head's parameters move

H is exact (Cholesky) when it is small, else Kronecker-factored (K-FAC): H ≈ A ⊗ B with
A = mean(diag p − p pᵀ), in which case every measure has a closed form per sample.
Parameters are ordered class-major: index c·D̃ + d, matching g = r ⊗ φ̃.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from irank.core.margins import given_margins
from irank.core.methods import CURVATURES, MEASURES
from irank.core.protocols import Shard

EXACT_MAX_PARAMETERS = 10_240
EXACT_MAX_FLOPS = 2e10  # exact H costs n·C·P² flops: keep it a small share of a forward pass


def augment(head_inputs: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """φ̃: the head inputs with a constant 1 appended when the head has a bias."""
    if not has_bias:
        return head_inputs
    return torch.cat([head_inputs, torch.ones(len(head_inputs), 1, dtype=head_inputs.dtype)], dim=1)


def residuals(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """r = p − e_y, the gradient of the cross-entropy w.r.t. the logits."""
    return probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)


def damped(matrix: torch.Tensor, relative: float) -> torch.Tensor:
    """matrix + λ I with λ = relative × its mean eigenvalue (trace / size)."""
    size = matrix.shape[0]
    strength = relative * torch.trace(matrix) / size
    strength = torch.clamp(strength, min=torch.finfo(matrix.dtype).tiny)
    return matrix + strength * torch.eye(size, dtype=matrix.dtype)


def chunk_size(row_elements: int, budget: int = 1 << 20) -> int:
    return max(1, budget // max(1, row_elements))


# The math below reads per-sample (p, φ̃) in chunks of rows through a RowReader, so that no float64
# copy of all rows' features or probabilities is ever made: memory stays at the float32 inputs plus
# one chunk. `tensor_rows` reads from full tensors (the pure-tensor API); `head_rows` computes a
# chunk's softmax and φ̃ from float32 logits and head inputs.
RowReader = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, end) → (p, φ̃), float64


def tensor_rows(probs: torch.Tensor, features: torch.Tensor) -> RowReader:
    return lambda start, end: (probs[start:end], features[start:end])


def head_rows(logits: torch.Tensor, head_inputs: torch.Tensor, has_bias: bool) -> RowReader:
    return lambda start, end: (torch.softmax(logits[start:end].double(), dim=1),
                               augment(head_inputs[start:end].double(), has_bias))


def spans(count: int, step: int):
    """[start, end) of consecutive chunks of `step` rows."""
    for start in range(0, count, step):
        yield start, min(count, start + step)


def _mean_over_rows(local_sum: torch.Tensor, count: int, shard: Shard | None) -> torch.Tensor:
    return local_sum / count if shard is None else shard.sum(local_sum) / shard.total


def gauss_newton_of(read: RowReader, count: int, classes: int, dims: int, shard: Shard | None = None) -> torch.Tensor:
    """Exact Gauss–Newton matrix of the head, mean over samples, undamped: (C·D̃, C·D̃).

    diag p − p pᵀ = M Mᵀ with M = diag(√p)(I − √p √pᵀ), so H = mean_i Σ_k (m_ik ⊗ φ̃_i)(m_ik ⊗ φ̃_i)ᵀ:
    one matrix product per chunk instead of a loop over samples. With a `shard` (torchrun), the rows
    read are this process's and the mean is over every process's rows.
    """
    size = classes * dims
    hessian = torch.zeros(size, size, dtype=torch.float64)
    eye = torch.eye(classes, dtype=torch.float64)
    for start, end in spans(count, chunk_size(classes * size)):
        probs, features = read(start, end)
        root = probs.clamp_min(0).sqrt()
        factor = root[:, :, None] * (eye - root[:, :, None] * root[:, None, :])  # (b, C, C): M
        rows = torch.einsum("bak,bi->bkai", factor, features).reshape(-1, size)
        hessian += rows.T @ rows
    return _mean_over_rows(hessian, count, shard)


def kfac_factors_of(read: RowReader, count: int, classes: int, dims: int,
                    shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A = mean(diag p − p pᵀ) (C×C) and B = mean φ̃ φ̃ᵀ (D̃×D̃); means over every process's rows with a `shard`."""
    output_sum = torch.zeros(classes, classes, dtype=torch.float64)
    input_sum = torch.zeros(dims, dims, dtype=torch.float64)
    for start, end in spans(count, chunk_size(classes + dims)):
        probs, features = read(start, end)
        output_sum += torch.diag(probs.sum(0)) - probs.T @ probs
        input_sum += features.T @ features
    return _mean_over_rows(output_sum, count, shard), _mean_over_rows(input_sum, count, shard)


def exact_influence_of(read: RowReader, count: int, labels: torch.Tensor, classes: int, dims: int, *,
                       damping: float, measure: str = "self-influence", absolute_damping: bool = False,
                       shard: Shard | None = None) -> torch.Tensor:
    """Influence measure of every sample read, with the exact (damped) Gauss–Newton matrix."""
    total = count if shard is None else shard.total
    hessian = gauss_newton_of(read, count, classes, dims, shard)
    if absolute_damping:
        hessian = hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    else:
        hessian = damped(hessian, damping)
    cholesky = torch.linalg.cholesky(hessian)
    second_moment = kfac_factors_of(read, count, classes, dims, shard)[1] if measure == "boundary-shift" else None
    size = hessian.shape[0]
    scores = torch.empty(count, dtype=torch.float64)
    for start, end in spans(count, chunk_size(size, budget=1 << 24)):
        probs, features = read(start, end)
        grads = torch.einsum("ba,bi->bai", residuals(probs, labels[start:end]), features).reshape(end - start, size)
        if measure == "self-influence":
            whitened = torch.linalg.solve_triangular(cholesky, grads.T, upper=False)
            scores[start:end] = (whitened**2).sum(0) / total
        else:
            shift = torch.cholesky_solve(grads.T, cholesky).T / total  # (b, P): Δθ
            if measure == "parameter-shift":
                scores[start:end] = shift.norm(dim=1)
            else:
                shift = shift.reshape(end - start, classes, -1)
                scores[start:end] = torch.einsum("bci,ij,bcj->b", shift, second_moment, shift)
    return scores


def kfac_influence_of(read: RowReader, count: int, labels: torch.Tensor, classes: int, dims: int, *,
                      damping: float, measure: str = "self-influence", absolute_damping: bool = False,
                      shard: Shard | None = None) -> torch.Tensor:
    """Influence measure of every sample read, with H ≈ (A + λ_A I) ⊗ (B + λ_B I), in closed form.

    `absolute_damping`: H ≈ A ⊗ B + λ I instead, λ = `damping` as given, the curvature of an objective with an
    L2 term of that strength (a refit probe's), the same objective as `exact_influence_of` with
    `absolute_damping`; it is inverted exactly in the factors' eigenbases (see `kfac_eigen_influence_of`).
    """
    n = count if shard is None else shard.total
    output_factor, input_factor = kfac_factors_of(read, count, classes, dims, shard)
    if absolute_damping:
        return kfac_eigen_influence_of(read, count, labels, output_factor, input_factor, damping=damping,
                                       measure=measure, total=n)
    output_inv = torch.linalg.inv(damped(output_factor, damping))
    input_inv = torch.linalg.inv(damped(input_factor, damping))
    scores = torch.empty(count, dtype=torch.float64)
    for start, end in spans(count, chunk_size(classes + dims)):
        probs, features = read(start, end)
        res = residuals(probs, labels[start:end])
        if measure == "self-influence":
            scores[start:end] = torch.einsum("na,ab,nb->n", res, output_inv, res) * torch.einsum(
                "ni,ij,nj->n", features, input_inv, features) / n
            continue
        output_shift = res @ output_inv  # A⁻¹ r (A symmetric)
        input_shift = features @ input_inv  # B⁻¹ φ̃
        if measure == "parameter-shift":
            scores[start:end] = output_shift.norm(dim=1) * input_shift.norm(dim=1) / n
        else:
            scores[start:end] = (output_shift**2).sum(1) * torch.einsum(
                "ni,ij,nj->n", input_shift, input_factor, input_shift) / n**2
    return scores


def kfac_eigen_influence_of(read: RowReader, count: int, labels: torch.Tensor, output_factor: torch.Tensor,
                            input_factor: torch.Tensor, *, damping: float, measure: str, total: int) -> torch.Tensor:
    """Influence measure of every sample read, with H = A ⊗ B + λ I inverted exactly.

    With A = Q_A diag(α) Q_Aᵀ and B = Q_B diag(β) Q_Bᵀ, H = (Q_A ⊗ Q_B) diag(α_a β_b + λ) (Q_A ⊗ Q_B)ᵀ, and a
    gradient r ⊗ φ̃ has the coordinates u_a v_b there (u = Q_Aᵀ r, v = Q_Bᵀ φ̃): every measure is a sum over the
    C × D̃ grid of 1 / (α_a β_b + λ) weights, per sample. `total`: the n of the mean loss.
    """
    output_values, output_vectors = torch.linalg.eigh(output_factor)
    input_values, input_vectors = torch.linalg.eigh(input_factor)
    inverse = 1.0 / (output_values.clamp_min(0)[:, None] * input_values.clamp_min(0)[None, :] + damping)  # (C, D̃)
    grid = {"self-influence": inverse, "parameter-shift": inverse**2,
            "boundary-shift": inverse**2 * input_values.clamp_min(0)[None, :]}[measure]
    scale = {"self-influence": total, "parameter-shift": total, "boundary-shift": total**2}[measure]
    scores = torch.empty(count, dtype=torch.float64)
    for start, end in spans(count, chunk_size(output_factor.shape[0] + input_factor.shape[0])):
        probs, features = read(start, end)
        u = residuals(probs, labels[start:end]) @ output_vectors
        v = features @ input_vectors
        scores[start:end] = torch.einsum("na,ab,nb->n", u**2, grid, v**2)
    if measure == "parameter-shift":
        return scores.sqrt() / scale
    return scores / scale


# The same on full tensors (p and φ̃ of every row, float64): the pure-tensor API the tests pin down.


def gauss_newton(probs: torch.Tensor, features: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
    return gauss_newton_of(tensor_rows(probs, features), len(probs), probs.shape[1], features.shape[1], shard)


def exact_influence(probs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, *, damping: float,
                    measure: str = "self-influence", absolute_damping: bool = False,
                    shard: Shard | None = None) -> torch.Tensor:
    """Influence measure of every sample with the exact (damped) Gauss–Newton matrix.

    With a `shard` the rows given are this process's; the curvature and n cover every process's rows.
    """
    return exact_influence_of(tensor_rows(probs, features), len(probs), labels, probs.shape[1], features.shape[1],
                              damping=damping, measure=measure, absolute_damping=absolute_damping, shard=shard)


def kfac_influence(probs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, *, damping: float,
                   measure: str = "self-influence", absolute_damping: bool = False,
                   shard: Shard | None = None) -> torch.Tensor:
    """Influence measure of every sample with H ≈ (A + λ_A I) ⊗ (B + λ_B I), in closed form.

    With a `shard` the rows given are this process's; the factors and n cover every process's rows.
    """
    return kfac_influence_of(tensor_rows(probs, features), len(probs), labels, probs.shape[1], features.shape[1],
                             damping=damping, measure=measure, absolute_damping=absolute_damping, shard=shard)


def choose_curvature(curvature: str, num_samples: int, num_classes: int, num_features: int) -> str:
    """'exact' when H is small enough to build and factor quickly, else 'kfac'."""
    if curvature != "auto":
        return curvature
    size = num_classes * num_features
    exact_cost = float(num_samples) * num_classes * size * size
    return "exact" if size <= EXACT_MAX_PARAMETERS and exact_cost <= EXACT_MAX_FLOPS else "kfac"


def influence_scores(
    logits: torch.Tensor,
    head_inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    has_bias: bool = True,
    damping: float = 0.01,
    measure: str = "self-influence",
    curvature: str = "auto",
    shard: Shard | None = None,
) -> tuple[torch.Tensor, str]:
    """Influence of every sample on the head; returns (scores in float64, curvature used).

    With a `shard` (torchrun) the rows given are this process's and the scores are theirs, on the
    curvature of every process's rows.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown influence measure {measure!r}; choose from {', '.join(MEASURES)}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose from {', '.join(CURVATURES)}")
    count, classes = logits.shape
    dims = head_inputs.shape[1] + int(has_bias)
    used = choose_curvature(curvature, count if shard is None else shard.total, classes, dims)
    compute = exact_influence_of if used == "exact" else kfac_influence_of
    read = head_rows(logits, head_inputs, has_bias)
    return compute(read, count, labels, classes, dims, damping=damping, measure=measure, shard=shard), used


def per_row(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    """function(logits chunk in float64, labels chunk) over chunks of rows: float64 (n,)."""
    values = torch.empty(len(logits), dtype=torch.float64)
    for start, end in spans(len(logits), chunk_size(logits.shape[1])):
        values[start:end] = function(logits[start:end].double(), labels[start:end])
    return values


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return per_row(lambda chunk, chunk_labels: F.cross_entropy(chunk, chunk_labels, reduction="none"), logits, labels)


def _negative_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return given_margins(logits, labels).neg_()


def negative_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Best other logit minus the given label's logit: high when the model disagrees with the label."""
    return per_row(_negative_margin, logits, labels)


def gradient_norm_of(read: RowReader, count: int, labels: torch.Tensor, row_elements: int) -> torch.Tensor:
    """‖g_i‖ = ‖p − e_y‖ · ‖φ̃‖ of every row read."""
    norms = torch.empty(count, dtype=torch.float64)
    for start, end in spans(count, chunk_size(row_elements)):
        probs, features = read(start, end)
        norms[start:end] = residuals(probs, labels[start:end]).norm(dim=1) * features.norm(dim=1)
    return norms


def gradient_norm(logits: torch.Tensor, head_inputs: torch.Tensor, labels: torch.Tensor, *, has_bias: bool = True) -> torch.Tensor:
    """‖g_i‖ = ‖p − e_y‖ · ‖φ̃‖, the Hessian-free baseline."""
    return gradient_norm_of(head_rows(logits, head_inputs, has_bias), len(logits), labels,
                            logits.shape[1] + head_inputs.shape[1])
