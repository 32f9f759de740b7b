"""Per-sample arrays past --memory-budget: DiskRows stands in for a tensor, and scores do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_tensor_inputs import embeddings, mlp_model  # noqa: F401  (module fixtures)

from irank.formats.tensor_rows import open_npy, release_pages
from irank.runtime.errors import UsageError
from irank.runtime.memory import DiskRows, MemoryBudget
from irank.runtime.sizes import parse_size


def test_disk_rows_read_back_what_index_copy_wrote_in_any_order():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.normal(size=(1000, 7)).astype(np.float32))
    stored = DiskRows(1000, 7)
    for part in np.array_split(rng.permutation(1000), 9):  # scattered rows: many short runs
        stored.index_copy_(0, torch.from_numpy(part), values[part])
    assert stored.shape == (1000, 7) and len(stored) == 1000 and stored.dtype == torch.float32
    assert torch.equal(stored[0:1000], values)
    assert torch.equal(stored[995:2000], values[995:]) and stored[1000:].shape == (0, 7)
    with pytest.raises(IndexError):
        stored.index_copy_(0, torch.tensor([1000]), values[:1])
    with pytest.raises(TypeError):
        stored[torch.tensor([1, 2])]
    wide = DiskRows(10, 3, dtype=torch.float64)  # the probe's logits
    exact = torch.randn(10, 3, dtype=torch.float64)
    wide.index_copy_(0, torch.arange(10), exact)
    assert wide[0:10].dtype == torch.float64 and torch.equal(wide[0:10], exact)


def test_budget_keeps_what_fits_in_memory_and_puts_the_rest_on_disk():
    budget = MemoryBudget(1000 * 4 * 10)
    first, second = budget.array(1000, 8), budget.array(1000, 8)  # 32 kB fits, then 8 kB is left
    assert isinstance(first, torch.Tensor) and isinstance(second, DiskRows) and budget.spilled == 32_000
    assert isinstance(budget.array(1000, 2), torch.Tensor)  # 8 kB still fits
    assert isinstance(MemoryBudget(None).array(10**5, 100), torch.Tensor)
    doubles = MemoryBudget(1000 * 8 * 3)
    assert isinstance(doubles.array(1000, 3, dtype=torch.float64), torch.Tensor) and doubles.left == 0
    assert isinstance(doubles.array(1, 1, dtype=torch.float64), DiskRows)


@pytest.mark.parametrize("text, size", [("0", 0), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), ("1.5g", 1_500_000_000),
                                        ("64 kib", 65536), ("1000", 1000)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1GB", "12parsecs", "GB", "1e9"])
def test_bad_sizes_name_the_flag(text):
    with pytest.raises(UsageError, match="--memory-budget"):
        parse_size(text)


@pytest.mark.parametrize("boundary", ["refit", "head"])
@pytest.mark.parametrize("method", ["influence", "loss", "gradnorm"])
def test_scores_on_disk_equal_the_scores_in_memory(cli, embeddings, mlp_model, tmp_path, boundary, method):  # noqa: F811
    outputs = []
    for budget in ("1GiB", "0"):
        out = tmp_path / f"scores-{budget}.csv"
        choice = ["--choice-rows", "128"] if boundary == "refit" else []  # on the head there is no layer to choose
        code, _, err = cli("score", mlp_model, embeddings["train"], "-o", out, "--boundary", boundary, "--method", method,
                           "--memory-budget", budget, "--device", "cpu", *choice, "-q")
        assert code == 0, err
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


def test_a_bad_budget_is_one_line(cli, embeddings, mlp_model, tmp_path):  # noqa: F811
    code, _, err = cli("score", mlp_model, embeddings["train"], "-o", tmp_path / "s.csv", "--memory-budget", "lots")
    assert code == 3 and err.strip().count("\n") == 0 and "--memory-budget lots" in err
    assert not (tmp_path / "s.csv").exists()


def test_released_pages_leave_the_values_readable(tmp_path):
    values = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "a.npy", values)
    mapped = open_npy(tmp_path / "a.npy")
    first = np.asarray(mapped[[0, 5]])
    release_pages(mapped)
    assert np.array_equal(first, values[[0, 5]]) and np.array_equal(np.asarray(mapped[[5, 19]]), values[[5, 19]])
