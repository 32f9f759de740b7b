"""The influence math against brute force: leave-one-out refits of a small convex problem."""

import pytest
import torch
import torch.nn.functional as F

from irank.core import influence


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank_a = a.argsort().argsort().double()
    rank_b = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1])


def fit_softmax_regression(features, labels, num_classes, l2, init=None):
    """argmin mean CE + l2/2 ‖θ‖² for logits = features @ Wᵀ (features already carry the 1 column)."""
    weight = (init.clone() if init is not None else torch.zeros(num_classes, features.shape[1], dtype=torch.float64))
    weight.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], lr=1, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T, labels) + 0.5 * l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


@pytest.fixture(scope="module")
def convex_problem():
    torch.manual_seed(0)
    n, dims, classes = 80, 3, 3
    centers = torch.randn(classes, dims, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (n,))
    inputs = centers[labels] + torch.randn(n, dims, dtype=torch.float64)
    flipped = torch.arange(n) % 8 == 0
    labels = torch.where(flipped, (labels + 1) % classes, labels)
    features = influence.augment(inputs, has_bias=True)
    l2 = 0.05
    weight = fit_softmax_regression(features, labels, classes, l2)
    return features, labels, classes, l2, weight


def test_self_influence_matches_leave_one_out_refits(convex_problem):
    features, labels, classes, l2, weight = convex_problem
    n = len(labels)
    logits = features @ weight.T
    own_loss = F.cross_entropy(logits, labels, reduction="none")
    loo_rise = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        keep = torch.arange(n) != i
        refit = fit_softmax_regression(features[keep], labels[keep], classes, l2, init=weight)
        loo_rise[i] = F.cross_entropy((features[i : i + 1] @ refit.T), labels[i : i + 1]) - own_loss[i]
    probs = torch.softmax(logits, dim=1)
    estimate = influence.exact_influence(probs, features, labels, damping=l2, absolute_damping=True)
    assert spearman(estimate, loo_rise) >= 0.95
    # Not just the order: the estimate is the first-order size of the change.
    assert torch.allclose(estimate, loo_rise, rtol=0.5, atol=1e-3)


def test_parameter_shift_matches_leave_one_out_refits(convex_problem):
    features, labels, classes, l2, weight = convex_problem
    n = len(labels)
    shifts = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        keep = torch.arange(n) != i
        refit = fit_softmax_regression(features[keep], labels[keep], classes, l2, init=weight)
        shifts[i] = (refit - weight).norm()
    probs = torch.softmax(features @ weight.T, dim=1)
    estimate = influence.exact_influence(
        probs, features, labels, damping=l2, absolute_damping=True, measure="parameter-shift"
    )
    assert spearman(estimate, shifts) >= 0.95


@pytest.fixture(scope="module")
def leave_one_out(convex_problem):
    """Per sample: the rise of its own loss, and the parameters' shift, when the problem is refit without it."""
    features, labels, classes, l2, weight = convex_problem
    own_loss = F.cross_entropy(features @ weight.T, labels, reduction="none")
    rise, shift = torch.empty(len(labels), dtype=torch.float64), torch.empty(len(labels), dtype=torch.float64)
    for i in range(len(labels)):
        keep = torch.arange(len(labels)) != i
        refit = fit_softmax_regression(features[keep], labels[keep], classes, l2, init=weight)
        rise[i] = F.cross_entropy(features[i : i + 1] @ refit.T, labels[i : i + 1]) - own_loss[i]
        shift[i] = (refit - weight).norm()
    return {"self-influence": rise, "parameter-shift": shift}


@pytest.mark.parametrize("measure, at_least", [("self-influence", 0.98), ("parameter-shift", 0.92)])
def test_kfac_ranks_like_leave_one_out_refits(convex_problem, leave_one_out, measure, at_least):
    """K-FAC (the probe's path past its size limit: the L2 as an absolute damping) against the brute force."""
    features, labels, _, l2, weight = convex_problem
    probs = torch.softmax(features @ weight.T, dim=1)
    estimate = influence.kfac_influence(probs, features, labels, damping=l2, absolute_damping=True, measure=measure)
    truth = leave_one_out[measure]
    assert spearman(estimate, truth) >= at_least
    assert float(((estimate - truth).abs() / truth.abs()).median()) <= 0.3  # the size too, to first order


def test_gauss_newton_equals_autograd_hessian(convex_problem):
    features, labels, classes, _, weight = convex_problem

    def mean_loss(flat):
        return F.cross_entropy(features @ flat.reshape(classes, -1).T, labels)

    hessian = torch.autograd.functional.hessian(mean_loss, weight.reshape(-1))
    probs = torch.softmax(features @ weight.T, dim=1)
    assert torch.allclose(influence.gauss_newton(probs, features), hessian, atol=1e-10)


def test_kfac_equals_exact_when_the_output_curvature_is_shared():
    torch.manual_seed(1)
    n, dims, classes = 50, 4, 3
    features = influence.augment(torch.randn(n, dims, dtype=torch.float64), has_bias=True)
    probs = torch.full((n, classes), 1.0 / classes, dtype=torch.float64)  # same p for all: H = A ⊗ B
    labels = torch.randint(0, classes, (n,))
    for measure in influence.MEASURES:
        exact = influence.exact_influence(probs, features, labels, damping=1e-9, measure=measure)
        kfac = influence.kfac_influence(probs, features, labels, damping=1e-9, measure=measure)
        assert torch.allclose(exact, kfac, rtol=1e-4), measure


def test_kfac_with_an_absolute_damping_inverts_the_exact_objective():
    """A refit probe's influence: H = GN + λI with λ its L2 (not a damping relative to each factor). Where the
    Gauss–Newton matrix is exactly A ⊗ B (every p alike), K-FAC's eigenbasis inverse equals the exact one to
    rounding, at a strong damping where a relative one would not."""
    torch.manual_seed(2)
    n, dims, classes = 60, 5, 4
    features = influence.augment(torch.randn(n, dims, dtype=torch.float64) * 2 + 1, has_bias=True)
    probs = torch.softmax(torch.randn(1, classes, dtype=torch.float64), dim=1).expand(n, classes).contiguous()
    labels = torch.randint(0, classes, (n,))
    for measure in influence.MEASURES:
        exact = influence.exact_influence(probs, features, labels, damping=0.3, measure=measure, absolute_damping=True)
        kfac = influence.kfac_influence(probs, features, labels, damping=0.3, measure=measure, absolute_damping=True)
        relative = influence.kfac_influence(probs, features, labels, damping=0.3, measure=measure)
        assert torch.allclose(exact, kfac, rtol=1e-10, atol=0), measure
        assert not torch.allclose(exact, relative, rtol=1e-2), measure


def test_the_probe_ranks_alike_on_its_exact_and_kfac_paths(monkeypatch):
    """probe_scores past its size limit (K-FAC) and below it (exact) score the same objective."""
    from irank.core import probe

    torch.manual_seed(3)
    features = torch.randn(300, 6) + torch.arange(300)[:, None] % 3
    labels = torch.arange(300) % 3
    labels[:30] = (labels[:30] + 1) % 3
    exact, _, _ = probe.probe_scores(features, labels, 3, l2=0.1, measure="self-influence")
    monkeypatch.setattr(probe, "probe_curvature", lambda *args: "kfac")
    kfac, _, _ = probe.probe_scores(features, labels, 3, l2=0.1, measure="self-influence")
    assert spearman(exact, kfac) >= 0.95


def test_kfac_ranks_like_exact_on_a_fitted_model(convex_problem):
    features, labels, _, _, weight = convex_problem
    probs = torch.softmax(features @ weight.T, dim=1)
    exact = influence.exact_influence(probs, features, labels, damping=0.01)
    kfac = influence.kfac_influence(probs, features, labels, damping=0.01)
    assert spearman(exact, kfac) >= 0.9


def test_baselines_follow_their_definitions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert torch.allclose(influence.negative_margin(logits, labels), torch.tensor([-2.0, 3.0], dtype=torch.float64))
    expected_loss = -torch.log_softmax(logits.double(), 1)[[0, 1], [0, 0]]
    assert torch.allclose(influence.cross_entropy(logits, labels), expected_loss)
    inputs = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    norms = influence.gradient_norm(logits, inputs, labels, has_bias=False)
    assert norms[1] == 0 and norms[0] > 0


def test_auto_curvature_switches_to_kfac_for_large_heads():
    assert influence.choose_curvature("auto", 1000, 10, 65) == "exact"
    assert influence.choose_curvature("auto", 1000, 1000, 2049) == "kfac"
    assert influence.choose_curvature("kfac", 10, 2, 3) == "kfac"
