"""L-BFGS with a strong-Wolfe line search, on one flat parameter vector: a pure function.

irank's probe fits are small smooth convex problems (a linear softmax classifier on fixed features).
`torch.optim.LBFGS` solves them as well, but the first `torch.optim` optimizer a process builds imports
`torch._dynamo`: 1.2 s and about 150 MiB on the benchmark's CPU, which every `irank score` on tensor rows
with the default boundary paid (image rows import it anyway, through torchvision). This is the textbook
method (Nocedal & Wright, *Numerical Optimization*, 2nd ed.: the two-loop recursion, Algorithm 7.4; the
line search, Algorithms 3.5 and 3.6, with the cubic step of equation 3.59), with nothing to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # point → (value, gradient)

SUFFICIENT_DECREASE = 1e-4  # c1 of the Wolfe conditions
CURVATURE = 0.9  # c2: a loose line search, as quasi-Newton methods want
MAX_LINE_EVALUATIONS = 25


@dataclass
class Result:
    point: torch.Tensor
    value: float
    iterations: int
    evaluations: int
    converged: bool  # the largest gradient entry fell to the tolerance


def cubic_step(t1: float, f1: float, d1: float, t2: float, f2: float, d2: float, low: float, high: float) -> float:
    """The minimizer in [low, high] of the cubic through (t1, f1) and (t2, f2) with slopes d1 and d2 there;
    the middle of [low, high] when the cubic has none (or the two points are one)."""
    if t1 == t2:
        return (low + high) / 2
    theta = d1 + d2 - 3 * (f1 - f2) / (t1 - t2)
    square = theta * theta - d1 * d2
    if square < 0:
        return (low + high) / 2
    gamma = square ** 0.5 * (1 if t2 > t1 else -1)
    step = t2 - (t2 - t1) * (d2 + gamma - theta) / (d2 - d1 + 2 * gamma)
    return min(max(step, low), high)


def strong_wolfe(objective: Objective, point: torch.Tensor, direction: torch.Tensor, step: float, value: float,
                 slope: float, tolerance_change: float) -> tuple[float, float, torch.Tensor, int]:
    """A step along `direction` meeting the strong Wolfe conditions: (step, value, gradient, evaluations).

    `value` and `slope` are the objective and its directional derivative at `point` (slope < 0). Returns the
    best step found when MAX_LINE_EVALUATIONS run out or the bracket shrinks to `tolerance_change`."""
    span = float(direction.abs().max())
    evaluations = 0

    def at(t: float) -> tuple[float, torch.Tensor, float]:
        nonlocal evaluations
        evaluations += 1
        new_value, gradient = objective(point + t * direction)
        return float(new_value), gradient, float(gradient @ direction)

    previous = (0.0, value, slope, None)  # (step, value, slope, gradient)
    bracket = None
    current = (step, *at(step))  # (step, value, gradient, slope)
    while True:
        t, f, g, d = current
        if f > value + SUFFICIENT_DECREASE * t * slope or (evaluations > 1 and f >= previous[1]):
            bracket = [previous, (t, f, d, g)]
            break
        if abs(d) <= -CURVATURE * slope:
            return t, f, g, evaluations
        if d >= 0:
            bracket = [(t, f, d, g), previous]
            break
        if evaluations >= MAX_LINE_EVALUATIONS:
            return t, f, g, evaluations
        low, high = t + 0.01 * (t - previous[0]), t * 10
        next_t = cubic_step(previous[0], previous[1], previous[2], t, f, d, low, high)
        previous = (t, f, d, g)
        current = (next_t, *at(next_t))
    # zoom: bracket[0] is the low end (the best value so far, meeting sufficient decrease), bracket[1] the other
    while evaluations < MAX_LINE_EVALUATIONS:
        (t_lo, f_lo, d_lo, g_lo), (t_hi, f_hi, d_hi, _) = bracket
        if abs(t_hi - t_lo) * span <= tolerance_change:
            break
        left, right = min(t_lo, t_hi), max(t_lo, t_hi)
        margin = 0.1 * (right - left)  # stay off the ends, where interpolation stalls
        t = cubic_step(t_lo, f_lo, d_lo, t_hi, f_hi, d_hi, left + margin, right - margin)
        f, g, d = at(t)
        if f > value + SUFFICIENT_DECREASE * t * slope or f >= f_lo:
            bracket[1] = (t, f, d, g)
            continue
        if abs(d) <= -CURVATURE * slope:
            return t, f, g, evaluations
        if d * (t_hi - t_lo) >= 0:
            bracket[1] = bracket[0]
        bracket[0] = (t, f, d, g)
    t_lo, f_lo, _, g_lo = bracket[0]
    if g_lo is None:  # no step improved on the start
        return 0.0, value, None, evaluations
    return t_lo, f_lo, g_lo, evaluations


def minimize(objective: Objective, start: torch.Tensor, *, max_iter: int = 500, history: int = 20,
             tolerance_grad: float = 1e-7, tolerance_change: float = 1e-12) -> Result:
    """argmin of a smooth function by L-BFGS, from `start` (a 1-D tensor, in the dtype and on the device the
    work is done in). `objective(point)` returns (value, gradient) as tensors.

    Stops when the largest gradient entry is at most `tolerance_grad`, when a step or the change in the
    value falls below `tolerance_change`, or after `max_iter` iterations (or 1.25 × that many evaluations)."""
    point = start.clone()
    value, gradient = objective(point)
    value = float(value)
    evaluations, iterations = 1, 0
    steps: list[torch.Tensor] = []
    changes: list[torch.Tensor] = []
    inverse_curvatures: list[float] = []
    converged = float(gradient.abs().max()) <= tolerance_grad
    while not converged and iterations < max_iter and evaluations < max_iter * 5 // 4:
        iterations += 1
        direction = -gradient
        alphas = []
        for step, change, rho in zip(reversed(steps), reversed(changes), reversed(inverse_curvatures)):
            alpha = rho * float(step @ direction)
            direction -= alpha * change
            alphas.append(alpha)
        if steps:
            direction *= float(steps[-1] @ changes[-1]) / float(changes[-1] @ changes[-1])
        for (step, change, rho), alpha in zip(zip(steps, changes, inverse_curvatures), reversed(alphas)):
            direction += (alpha - rho * float(change @ direction)) * step
        slope = float(gradient @ direction)
        if slope > -tolerance_change:  # not a descent direction: nothing left to gain
            break
        first = 1.0 if steps else min(1.0, 1.0 / float(gradient.abs().sum()))
        t, new_value, new_gradient, used = strong_wolfe(objective, point, direction, first, value, slope,
                                                        tolerance_change)
        evaluations += used
        if new_gradient is None:
            break
        step = t * direction
        change = new_gradient - gradient
        curvature = float(step @ change)
        if curvature > 1e-10:
            if len(steps) == history:
                steps.pop(0), changes.pop(0), inverse_curvatures.pop(0)
            steps.append(step)
            changes.append(change)
            inverse_curvatures.append(1.0 / curvature)
        point += step
        value_change = abs(new_value - value)
        value, gradient = new_value, new_gradient
        converged = float(gradient.abs().max()) <= tolerance_grad
        if float(step.abs().max()) <= tolerance_change or value_change < tolerance_change:
            break
    return Result(point, value, iterations, evaluations, converged)
