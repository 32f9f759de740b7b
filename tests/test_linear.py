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
