"""Tensor rows read with positioned reads (irank/rowfile.py): the values np.load and safetensors give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from irank.formats.tensor_rows import TensorDataset, TensorRows
from irank.runtime.rowfile import RowFile, layout_of, runs

NPY_DTYPES = ["<f4", ">f4", "<f2", "<f8", "<i8", ">i4", "|u1", "|b1"]
SAFETENSORS_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int16,
                      torch.uint8, torch.bool]


def values_of(rng: np.random.Generator, rows: int, row_shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-50, 50, size=(rows, *row_shape)).astype(np.float64) / 4


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(NPY_DTYPES), rows=st.integers(1, 30), row_shape=st.sampled_from([(), (3,), (2, 2)]),
       picks=st.lists(st.integers(0, 10_000), max_size=40), seed=st.integers(0, 3))
def test_npy_rows_are_np_loads(tmp_path_factory, dtype, rows, row_shape, picks, seed):
    values = values_of(np.random.default_rng(seed), rows, row_shape).astype(dtype)
    file = tmp_path_factory.mktemp("npy") / "a.npy"
    np.save(file, values)
    indices = np.array([pick % rows for pick in picks], dtype=np.int64)
    read = RowFile(file, layout_of(file, None)).read(indices)
    expected = np.load(file)[indices].astype(np.float32).reshape(len(indices), *row_shape)
    assert read.dtype == torch.float32 and read.shape == expected.shape
    assert np.array_equal(read.numpy(), expected)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(SAFETENSORS_DTYPES), rows=st.integers(1, 30), row_shape=st.sampled_from([(), (3,), (2, 2)]),
       picks=st.lists(st.integers(0, 10_000), max_size=40), seed=st.integers(0, 3))
def test_safetensors_rows_are_the_libraries(tmp_path_factory, dtype, rows, row_shape, picks, seed):
    tensor = torch.from_numpy(values_of(np.random.default_rng(seed), rows, row_shape)).to(dtype)
    file = tmp_path_factory.mktemp("st") / "a.safetensors"
    # a tensor before and after the one read, so its bytes start past the header at an offset of their own
    save_file({"before": torch.arange(7, dtype=torch.int8), "rows": tensor, "zafter": torch.ones(3)}, str(file))
    indices = np.array([pick % rows for pick in picks], dtype=np.int64)
    read = RowFile(file, layout_of(file, "rows")).read(indices)
    expected = tensor[torch.from_numpy(indices)].to(torch.float32).reshape(len(indices), *row_shape)
    assert read.dtype == torch.float32 and torch.equal(read, expected)


def test_runs_of_consecutive_rows():
    firsts, ends = runs(np.array([0, 1, 2, 5, 7, 8, 20]))
    assert firsts.tolist() == [0, 3, 4, 6] and ends.tolist() == [3, 4, 6, 7]
    assert [part.tolist() for part in runs(np.zeros(0, dtype=np.int64))] == [[], []]


def test_rows_past_the_end_and_a_truncated_file_raise(tmp_path):
    file = tmp_path / "a.npy"
    np.save(file, np.arange(40, dtype=np.float32).reshape(10, 4))
    reader = RowFile(file, layout_of(file, None))
    with pytest.raises(IndexError, match="index 10 is out of range"):
        reader.read(np.array([3, 10]))
    reader.close()
    file.write_bytes(file.read_bytes()[:-20])  # the last row and a bit of the one before are gone
    reader = RowFile(file, layout_of(file, None))
    assert torch.equal(reader.read(np.array([0, 7]))[1], torch.arange(28, 32, dtype=torch.float32))
    with pytest.raises(OSError, match="a.npy: the file ends before"):
        reader.read(np.array([8]))


def test_a_fortran_ordered_npy_is_read_through_a_memory_map(tmp_path):
    values = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(6, 4))
    np.save(tmp_path / "f.npy", values)
    assert layout_of(tmp_path / "f.npy", None) is None
    rows = TensorRows.build("m.csv", tmp_path, ["f.npy"] * 6, None, np.arange(6))
    dataset = TensorDataset(rows, (4,))
    read = dataset.__getitems__([5, 0, 2])
    assert np.array_equal(np.stack([tensor.numpy() for tensor, _, _ in read]), values[[5, 0, 2]])


def mapped_files() -> set[str]:
    return {line.split(maxsplit=5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("name", ["rows.npy", "rows.safetensors"])
def test_reading_rows_maps_nothing_of_the_file(tmp_path, name):
    values = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    file = tmp_path / name
    if name.endswith(".npy"):
        np.save(file, values)
    else:
        save_file({"x": torch.from_numpy(values)}, str(file))
    rows = TensorRows.build("m.csv", tmp_path, [name] * 1000, None, np.arange(1000))
    dataset = TensorDataset(rows, (4,))
    read = dataset.__getitems__(list(range(0, 1000, 7)))
    assert np.array_equal(np.stack([tensor.numpy() for tensor, _, _ in read]), values[::7])
    assert str(file) not in mapped_files()


def test_at_most_open_files_stay_open(tmp_path, monkeypatch):
    import irank.formats.tensor_rows

    monkeypatch.setattr(irank.formats.tensor_rows, "OPEN_FILES", 3)
    names = [f"f{number}.npy" for number in range(10)]
    for number, name in enumerate(names):
        np.save(tmp_path / name, np.full((2, 3), number, dtype=np.float32) + np.arange(2, dtype=np.float32)[:, None])
    paths = [name for name in names for _ in range(2)]
    rows = TensorRows.build("m.csv", tmp_path, paths, None, np.tile(np.arange(2), 10))
    dataset = TensorDataset(rows, (3,))
    opened = []
    for items in ([0, 5, 19], [2, 4, 6, 8], [1, 18, 3], list(range(20))):
        read = dataset.__getitems__(items)
        assert [float(tensor[0]) for tensor, _, _ in read] == [item // 2 + item % 2 for item in items]
        assert len(dataset._readers) <= 3
        opened += [reader for reader in dataset._readers.values() if reader not in opened]
    assert all(reader.handle is None for reader in opened if reader not in dataset._readers.values())


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux's /proc")
def test_a_manifest_of_more_files_than_descriptors_scores(tmp_path):
    """One .npy per sample, 300 of them, under a limit of 200 open files (the common default is 1,024)."""
    import resource
    import subprocess
    import sys

    import pandas as pd

    rng = np.random.default_rng(0)
    for number in range(300):
        np.save(tmp_path / f"s{number:03d}.npy", rng.normal(size=(1, 4)).astype(np.float32) + 3 * (number % 2))
    pd.DataFrame({"path": [f"s{number:03d}.npy" for number in range(300)], "index": 0,
                  "label": [f"c{number % 2}" for number in range(300)]}).to_csv(tmp_path / "m.csv", index=False)

    def limited():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    def irank(*args):
        return subprocess.run([sys.executable, "-m", "irank", *map(str, args), "-q"], capture_output=True, text=True,
                              preexec_fn=limited, timeout=300)

    trained = irank("train", "mlp-4-8", tmp_path / "m.csv", "-o", tmp_path / "model.safetensors", "--epochs", "1")
    assert trained.returncode == 0, trained.stderr
    scored = irank("score", tmp_path / "model.safetensors", tmp_path / "m.csv", "-o", tmp_path / "s.csv")
    assert scored.returncode == 0, scored.stderr
    assert len(pd.read_csv(tmp_path / "s.csv")) == 300
