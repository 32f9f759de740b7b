import torch
import torch.nn.functional as F

from irank.linear import fit_softmax_regression


def test_refit_reaches_the_regularized_optimum():
    torch.manual_seed(0)
    features = torch.randn(200, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 4
    labels = (features[:, 0] + features[:, 1] / 10 > 4).long() + (features[:, 3] > 6).long()
    weight, bias = fit_softmax_regression(features, labels, 3, l2=0.01)
    # Stationarity in the standardized coordinates the fit works in: the gradient vanishes there.
    mean, scale = features.double().mean(0), features.double().std(0)
    std_weight = (weight * scale).requires_grad_(True)
    std_bias = (bias + weight @ mean).requires_grad_(True)
    standardized = (features.double() - mean) / scale
    loss = F.cross_entropy(standardized @ std_weight.T + std_bias, labels) + 0.005 * (std_weight**2).sum()
    loss.backward()
    assert std_weight.grad.abs().max() < 1e-6 and std_bias.grad.abs().max() < 1e-6
    accuracy = ((features.double() @ weight.T + bias).argmax(1) == labels).float().mean()
    majority = labels.bincount().max() / len(labels)
    assert accuracy > majority + 0.2


def test_a_fit_on_a_standardized_copy_equals_the_chunked_fit_bit_for_bit(monkeypatch):
    """Small sets are standardized once into a float64 copy (faster); larger ones chunk by chunk on every
    evaluation. Both compute the same numbers in the same order, so the fits are identical."""
    from irank import linear

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(300, 7, generator=generator) * 3 + 5
    labels = torch.randint(0, 3, (300,), generator=generator)
    copied = linear.fit_with_scaling(features, labels, 3, l2=0.1)
    assert linear.fit_rows(features, linear.standardizer(features))[1] is None  # the copy was used
    monkeypatch.setattr(linear, "PRESTANDARDIZE_BYTES", 0)
    assert linear.fit_rows(features, linear.standardizer(features))[1] is not None  # now chunk by chunk
    chunked = linear.fit_with_scaling(features, labels, 3, l2=0.1)
    for a, b in zip(copied[:2], chunked[:2]):
        assert torch.equal(a, b)
