"""Per-batch outputs written into host arrays one batch behind (HostRows): the same arrays as writing at once."""

from __future__ import annotations

import pytest
import torch

import irank
from irank.model.forward import forward_pass
from irank.model.inputs import make_loader
from irank.model.placement import Placement
from irank.model.prepare import prepare
from irank.model.transfer import HostRows
from irank.options import ModelOptions
from irank.runtime.memory import DiskRows

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batches_of(count: int, width: int, seed: int, dtype=torch.float32):
    """Shuffled rows in uneven batches, with values of `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator)
    values = torch.randn(count, width, generator=generator).to(dtype)
    sizes = [3, 1, 5, 4, 2]
    start, i = 0, 0
    while start < count:
        rows = order[start : start + sizes[i % len(sizes)]]
        yield rows, values[rows]
        start, i = start + len(rows), i + 1


def fill(host: HostRows, arrays, count: int, width: int, seed: int, dtype=torch.float32):
    with host:
        for rows, values in batches_of(count, width, seed, dtype):
            host.put([(array, rows, values * (k + 1)) for k, array in enumerate(arrays)])
    return arrays


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_deferred_writes_give_the_arrays_that_immediate_writes_give(dtype, tmp_path):
    at_once = fill(HostRows(torch.device("cpu")), [torch.full((23, 4), -1.0), torch.full((23, 4), -1.0)], 23, 4, 0, dtype)
    behind = fill(HostRows(torch.device("cpu"), deferred=True), [torch.full((23, 4), -1.0), DiskRows(23, 4, str(tmp_path))],
                  23, 4, 0, dtype)
    assert (at_once[0] != -1).all()
    assert torch.equal(at_once[0], behind[0]) and torch.equal(at_once[1], behind[1][0:23])
    assert at_once[0].dtype == torch.float32


def test_a_deferred_batch_is_written_once_the_next_is_put_or_on_flush():
    array = torch.zeros(6, 2)
    host = HostRows(torch.device("cpu"), deferred=True)
    host.put([(array, torch.tensor([0, 1]), torch.ones(2, 2))])
    assert not array.any()  # one batch behind
    host.put([(array, torch.tensor([4]), torch.full((1, 2), 2.0))])
    assert array[:2].eq(1).all() and not array[2:].any()
    host.flush()
    assert array[4].eq(2).all()
    host.flush()  # nothing pending: nothing happens
    assert array.sum() == 8


def test_a_failed_pass_leaves_its_pending_batch_unwritten():
    array = torch.zeros(4, 2)
    with pytest.raises(RuntimeError):
        with HostRows(torch.device("cpu"), deferred=True) as host:
            host.put([(array, torch.tensor([0]), torch.ones(1, 2))])
            host.put([(array, torch.tensor([1]), torch.ones(1, 2))])
            raise RuntimeError("the pass failed")
    assert array[0].eq(1).all() and not array[1:].any()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_writes_land_one_batch_behind_and_equal_the_values(dtype):
    arrays = [torch.full((41, 7), -1.0), torch.full((41, 7), -1.0)]
    expected = fill(HostRows(torch.device("cpu")), [torch.full((41, 7), -1.0), torch.full((41, 7), -1.0)], 41, 7, 1, dtype)
    with HostRows(torch.device("cuda")) as host:
        assert host.deferred
        for rows, values in batches_of(41, 7, 1, dtype):
            host.put([(array, rows, values.cuda() * (k + 1)) for k, array in enumerate(arrays)])
    assert torch.equal(arrays[0], expected[0]) and torch.equal(arrays[1], expected[1])


@needs_cuda
def test_forward_pass_on_cuda_gives_the_cpu_outputs(tiny_model, tiny_data):
    prepared = prepare(tiny_model, tiny_data["train"], ModelOptions())
    loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=17)
    cpu = forward_pass(prepared.model, prepared.head, loader, num_rows=len(prepared.labels), device=torch.device("cpu"))
    gpu = forward_pass(prepared.model, prepared.head, loader, num_rows=len(prepared.labels),
                       device=Placement(torch.device("cuda")))
    torch.testing.assert_close(gpu.logits, cpu.logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu.head_inputs, cpu.head_inputs, rtol=1e-3, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("boundary", ["head", "refit"])
def test_score_on_cuda_ranks_as_on_cpu(tiny_model, tiny_data, boundary):
    """In full precision on the GPU the scores are the CPU's to float tolerance."""
    tables = {}
    for device in ("cpu", "cuda"):
        run = irank.RunOptions(device=device, batch_size=32, precision="fp32")
        tables[device] = irank.score(tiny_model, tiny_data["train"], boundary=irank.BoundaryOptions(kind=boundary),
                                     run_options=run).table.set_index("id")["score"]
    torch.testing.assert_close(torch.tensor(tables["cuda"].reindex(tables["cpu"].index).to_numpy()),
                               torch.tensor(tables["cpu"].to_numpy()), rtol=1e-3, atol=1e-4)
