"""irank's own L-BFGS (`irank.core.lbfgs`): it finds known minima, agrees with torch.optim.LBFGS on the probe's
problem, keeps to its limits, and spares `score` the import of torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from irank.core import lbfgs
from irank.core.linear import _objective, _packed, data_term


def quadratic(matrix, vector):
    def objective(point):
        return 0.5 * point @ matrix @ point - vector @ point, matrix @ point - vector
    return objective


def rosenbrock(point):
    x, y = point
    value = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    gradient = torch.stack([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])
    return value, gradient


def test_the_minimum_of_a_convex_quadratic_is_the_solution_of_its_linear_system():
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(20, 20, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T + torch.eye(20, dtype=torch.float64)
    vector = torch.randn(20, generator=generator, dtype=torch.float64)
    result = lbfgs.minimize(quadratic(matrix, vector), torch.zeros(20, dtype=torch.float64), tolerance_grad=1e-5)
    assert result.converged
    torch.testing.assert_close(result.point, torch.linalg.solve(matrix, vector), rtol=0, atol=1e-4)


def test_it_follows_the_rosenbrock_valley_to_its_minimum():
    """A non-convex classic: the line search must both extrapolate and zoom to get there."""
    result = lbfgs.minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), tolerance_grad=1e-9,
                             tolerance_change=0)
    assert result.converged
    torch.testing.assert_close(result.point, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


def test_it_keeps_to_its_iteration_limit_and_says_it_did_not_converge():
    result = lbfgs.minimize(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), max_iter=3)
    assert result.iterations <= 3 and result.evaluations <= 3 * 5 // 4 + lbfgs.MAX_LINE_EVALUATIONS
    assert not result.converged


def test_a_start_at_the_minimum_costs_one_evaluation():
    result = lbfgs.minimize(rosenbrock, torch.ones(2, dtype=torch.float64))
    assert (result.iterations, result.evaluations, result.converged) == (0, 1, True)
    assert torch.equal(result.point, torch.ones(2, dtype=torch.float64))


def test_the_cubic_step_is_exact_on_a_quadratic_and_stays_in_its_bounds():
    # f(t) = (t - 0.3)²: values 0.09 and 0.49, slopes -0.6 and 1.4 at t = 0 and 1; the cubic through them is f
    assert lbfgs.cubic_step(0.0, 0.09, -0.6, 1.0, 0.49, 1.4, 0.0, 1.0) == pytest.approx(0.3)
    assert lbfgs.cubic_step(1.0, 0.49, 1.4, 0.0, 0.09, -0.6, 0.0, 1.0) == pytest.approx(0.3)
    assert lbfgs.cubic_step(0.0, 0.09, -0.6, 1.0, 0.49, 1.4, 0.5, 1.0) == 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_probe_fit_agrees_with_torch_optim_lbfgs(dtype):
    """The same method as torch.optim.LBFGS(line_search_fn="strong_wolfe"), which the probe fits used
    before: the same optimum of the softmax regression."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(400, 12, generator=generator, dtype=dtype)
    labels = (features[:, :4] + 0.5 * torch.randn(400, 4, generator=generator, dtype=dtype)).argmax(1)
    l2, shape = 0.05, torch.Size((4, 12))
    objective = _objective(shape, len(features), l2, lambda weight, bias: data_term(features, labels, weight, bias))
    with torch.no_grad():
        ours = lbfgs.minimize(objective, torch.zeros(4 * 13, dtype=dtype))
    weight, bias = torch.zeros(4, 12, dtype=dtype, requires_grad=True), torch.zeros(4, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=500, history_size=20, tolerance_grad=1e-7,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    tolerance = 1e-6 if dtype == torch.float64 else 1e-3
    ours_weight, ours_bias = _packed(shape, ours.point)
    torch.testing.assert_close(ours_weight, weight.detach(), rtol=0, atol=tolerance)
    torch.testing.assert_close(ours_bias, bias.detach(), rtol=0, atol=tolerance)
    assert ours.value == pytest.approx(float(closure().detach()), rel=1e-6 if dtype == torch.float64 else 1e-5)


def test_score_on_tensor_rows_does_not_import_dynamo(tmp_path):
    """The first torch.optim optimizer imports torch._dynamo (1.2 s and ~150 MiB on the benchmark's CPU): the
    default refit boundary's probe fits build none. (Images import it anyway, through torchvision.)"""
    import irank
    from irank.formats import synthetic

    manifest, _ = synthetic.make_embeddings(tmp_path, num_rows=300, dim=8, num_classes=3, seed=1)
    checkpoint = tmp_path / "mlp.safetensors"
    irank.train("mlp-8-16", str(manifest), output=str(checkpoint),
                train_options=irank.TrainOptions(scope="full", epochs=2, lr=0.05, seed=0),
                run_options=irank.RunOptions(device="cpu", batch_size=64))
    script = ("import sys, irank; irank.score(sys.argv[1], sys.argv[2]); "
              "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(manifest)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
