import pytest
import torch
import torch.nn.functional as F

from irank.core.linear import fit_softmax_regression


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
    from irank.core import linear

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


def test_a_fit_runs_on_the_cpu_without_a_cuda_device_or_for_rows_on_disk(tmp_path):
    from irank.core.linear import fit_device
    from irank.runtime.memory import DiskRows

    rows = torch.randn(8, 3)
    assert fit_device(rows, None).type == "cpu"
    assert fit_device(rows, torch.device("cpu")).type == "cpu"
    assert fit_device(DiskRows(8, 3, str(tmp_path)), torch.device("cuda")).type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("chunked", [False, True])
def test_a_fit_on_the_gpu_agrees_with_the_cpu_fit(monkeypatch, chunked):
    """The float64 fit on a CUDA device reaches the same optimum; only the order of its sums differs."""
    from irank.core import linear

    if chunked:  # raw float32 rows standardized chunk by chunk on every evaluation
        monkeypatch.setattr(linear, "PRESTANDARDIZE_BYTES", 0)
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3000, 40, generator=generator) * 3 + 1
    labels = (features[:, :4] @ torch.randn(4, 5, generator=generator)).argmax(1)
    labels[:300] = torch.randint(0, 5, (300,), generator=generator)
    cpu = linear.fit_with_scaling(features, labels, 5, l2=0.1)
    gpu = linear.fit_with_scaling(features, labels, 5, l2=0.1, device=torch.device("cuda"))
    assert gpu[0].device.type == "cpu" and gpu[0].dtype == torch.float64
    print("largest weight difference", float((gpu[0] - cpu[0]).abs().max()), "bias", float((gpu[1] - cpu[1]).abs().max()))
    torch.testing.assert_close(gpu[0], cpu[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=0, atol=1e-5)
