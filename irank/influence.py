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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .distributed import Shard

MEASURES = ("self-influence", "boundary-shift", "parameter-shift")
CURVATURES = ("auto", "exact", "kfac")
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


def _chunk_size(row_elements: int, budget: int = 1 << 22) -> int:
    return max(1, budget // max(1, row_elements))


def gauss_newton(probs: torch.Tensor, features: torch.Tensor, shard: Shard | None = None) -> torch.Tensor:
    """Exact Gauss–Newton matrix of the head, mean over samples, undamped: (C·D̃, C·D̃).

    diag p − p pᵀ = M Mᵀ with M = diag(√p)(I − √p √pᵀ), so H = mean_i Σ_k (m_ik ⊗ φ̃_i)(m_ik ⊗ φ̃_i)ᵀ:
    one matrix product per chunk instead of a loop over samples. With a `shard` (torchrun), the rows
    given are this process's and the mean is over every process's rows.
    """
    n, classes = probs.shape
    size = classes * features.shape[1]
    hessian = torch.zeros(size, size, dtype=probs.dtype)
    eye = torch.eye(classes, dtype=probs.dtype)
    step = _chunk_size(classes * size)
    for start in range(0, n, step):
        root = probs[start : start + step].clamp_min(0).sqrt()
        factor = root[:, :, None] * (eye - root[:, :, None] * root[:, None, :])  # (b, C, C): M
        rows = torch.einsum("bak,bi->bkai", factor, features[start : start + step]).reshape(-1, size)
        hessian += rows.T @ rows
    return hessian / n if shard is None else shard.sum(hessian) / shard.total


def kfac_factors(probs: torch.Tensor, features: torch.Tensor, shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A = mean(diag p − p pᵀ) (C×C) and B = mean φ̃ φ̃ᵀ (D̃×D̃); means over every process's rows with a `shard`."""
    if shard is not None:
        return torch.diag(shard.mean(probs)) - shard.gram(probs), shard.gram(features)
    n = probs.shape[0]
    output_factor = torch.diag(probs.mean(0)) - probs.T @ probs / n
    input_factor = features.T @ features / n
    return output_factor, input_factor


def exact_influence(
    probs: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    damping: float,
    measure: str = "self-influence",
    absolute_damping: bool = False,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Influence measure of every sample with the exact (damped) Gauss–Newton matrix.

    With a `shard` the rows given are this process's; the curvature and n cover every process's rows.
    """
    n, classes = probs.shape
    total = n if shard is None else shard.total
    hessian = gauss_newton(probs, features, shard)
    if absolute_damping:
        hessian = hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    else:
        hessian = damped(hessian, damping)
    cholesky = torch.linalg.cholesky(hessian)
    second_moment = features.T @ features / n if shard is None else shard.gram(features)
    res = residuals(probs, labels)
    size = hessian.shape[0]
    scores = torch.empty(n, dtype=probs.dtype)
    step = _chunk_size(size, budget=1 << 24)
    for start in range(0, n, step):
        end = min(n, start + step)
        grads = torch.einsum("ba,bi->bai", res[start:end], features[start:end]).reshape(end - start, size)
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


def kfac_influence(
    probs: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    damping: float,
    measure: str = "self-influence",
    shard: Shard | None = None,
) -> torch.Tensor:
    """Influence measure of every sample with H ≈ (A + λ_A I) ⊗ (B + λ_B I), in closed form.

    With a `shard` the rows given are this process's; the factors and n cover every process's rows.
    """
    n = probs.shape[0] if shard is None else shard.total
    output_factor, input_factor = kfac_factors(probs, features, shard)
    output_inv = torch.linalg.inv(damped(output_factor, damping))
    input_inv = torch.linalg.inv(damped(input_factor, damping))
    res = residuals(probs, labels)
    if measure == "self-influence":
        return torch.einsum("na,ab,nb->n", res, output_inv, res) * torch.einsum(
            "ni,ij,nj->n", features, input_inv, features
        ) / n
    output_shift = res @ output_inv  # A⁻¹ r (A symmetric)
    input_shift = features @ input_inv  # B⁻¹ φ̃
    if measure == "parameter-shift":
        return output_shift.norm(dim=1) * input_shift.norm(dim=1) / n
    return (output_shift**2).sum(1) * torch.einsum("ni,ij,nj->n", input_shift, input_factor, input_shift) / n**2


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
    probs = torch.softmax(logits.double(), dim=1)
    features = augment(head_inputs.double(), has_bias)
    used = choose_curvature(curvature, len(probs) if shard is None else shard.total, probs.shape[1], features.shape[1])
    compute = exact_influence if used == "exact" else kfac_influence
    return compute(probs, features, labels, damping=damping, measure=measure, shard=shard), used


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), labels, reduction="none")


def negative_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Best other logit minus the given label's logit: high when the model disagrees with the label."""
    logits = logits.double()
    given = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return others.max(dim=1).values - given


def gradient_norm(logits: torch.Tensor, head_inputs: torch.Tensor, labels: torch.Tensor, *, has_bias: bool = True) -> torch.Tensor:
    """‖g_i‖ = ‖p − e_y‖ · ‖φ̃‖, the Hessian-free baseline."""
    probs = torch.softmax(logits.double(), dim=1)
    return residuals(probs, labels).norm(dim=1) * augment(head_inputs.double(), has_bias).norm(dim=1)
