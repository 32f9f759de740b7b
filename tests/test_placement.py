"""Memory layout and precision of the model's pass: channels-last and autocast change speed, not the ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import irank
from irank.model.architectures import BUILTIN_ARCHS, vector_model
from irank.model.placement import resolve_placement
from irank.runtime.errors import UsageError


def test_auto_turns_channels_last_on_for_wide_conv_nets_only():
    assert resolve_placement(BUILTIN_ARCHS["small-cnn"](4), "cpu").channels_last
    assert not resolve_placement(BUILTIN_ARCHS["tiny-cnn"](4), "cpu").channels_last  # 8–32 channels
    assert not resolve_placement(vector_model("mlp-8-16", 4), "cpu").channels_last
    assert not resolve_placement(BUILTIN_ARCHS["small-cnn"](4), "cpu", channels_last="off").channels_last
    assert resolve_placement(BUILTIN_ARCHS["tiny-cnn"](4), "cpu", channels_last="on").channels_last


def test_auto_precision_is_full_on_cpu_and_the_named_one_otherwise():
    model = BUILTIN_ARCHS["tiny-cnn"](4)
    assert resolve_placement(model, "cpu").autocast_dtype is None
    assert resolve_placement(model, "cpu", precision="bf16").autocast_dtype is torch.bfloat16
    assert resolve_placement(model, "cpu", precision="fp16").precision == "fp16"


@pytest.mark.parametrize("option", [{"channels_last": "sideways"}, {"precision": "fp8"}])
def test_unknown_settings_are_refused(option):
    with pytest.raises(UsageError, match="choose from"):
        resolve_placement(BUILTIN_ARCHS["tiny-cnn"](4), "cpu", **option)


def scores_of(tiny_data, tiny_model, tmp_path, name, **run):
    output = tmp_path / f"{name}.csv"
    irank.score(tiny_model, tiny_data["train"], output=str(output),
                run_options=irank.RunOptions(device="cpu", batch_size=64, **run))
    return pd.read_csv(output).set_index("id").sort_index(), json.loads(Path(str(output) + ".json").read_text())


@pytest.mark.parametrize("boundary", ["refit", "head"])
def test_channels_last_gives_the_same_scores_as_the_default_layout(tiny_data, tiny_model, tmp_path, boundary):
    outputs = {}
    for layout in ("on", "off"):
        output = tmp_path / f"{layout}.csv"
        irank.score(tiny_model, tiny_data["train"], output=str(output), boundary=irank.BoundaryOptions(kind=boundary),
                    run_options=irank.RunOptions(device="cpu", batch_size=64, channels_last=layout))
        outputs[layout] = pd.read_csv(output).set_index("id").sort_index()
    on, off = outputs["on"], outputs["off"]
    assert np.allclose(on["score"], off["score"], rtol=1e-3, atol=1e-5)
    # the ranks may swap only between near-tied scores
    assert np.corrcoef(on["rank"], off["rank"])[0, 1] > 0.999


def test_bf16_autocast_keeps_the_ranking_and_says_so(tiny_data, tiny_model, tmp_path):
    full, full_sidecar = scores_of(tiny_data, tiny_model, tmp_path, "fp32")
    half, half_sidecar = scores_of(tiny_data, tiny_model, tmp_path, "bf16", precision="bf16")
    assert full_sidecar["parameters"]["precision"] == "fp32"
    assert half_sidecar["parameters"]["precision"] == "bf16"
    assert half_sidecar["parameters"]["channels_last"] is False  # tiny-cnn: too narrow for auto
    assert half["score"].dtype == np.float64 and np.isfinite(half["score"]).all()
    correlation = np.corrcoef(full["score"].rank(), half["score"].rank())[0, 1]  # Spearman's, without scipy
    assert correlation > 0.95
    top = (full["label"] != full["true_label"]).sum()  # as many as there are flipped labels

    def caught(table):
        first = table.sort_values("rank").head(top)
        return int((first["label"] != first["true_label"]).sum())

    assert caught(full) >= top // 2
    assert caught(half) >= caught(full) - 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_refine_under_autocast_writes_a_full_precision_contiguous_checkpoint(tiny_data, tiny_model, tmp_path, precision):
    output = tmp_path / "refined.safetensors"
    irank.refine(tiny_model, tiny_data["train"], output=str(output),
                 train_options=irank.TrainOptions(scope="full", epochs=1, lr=0.01, seed=0),
                 run_options=irank.RunOptions(device="cpu", batch_size=64, precision=precision, channels_last="on"))
    before, after = load_file(tiny_model), load_file(str(output))
    assert before.keys() == after.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and tensor.is_contiguous() and torch.isfinite(tensor).all()
    changed = [name for name in after if after[name].is_floating_point() and not torch.equal(after[name], before[name])]
    assert changed  # it trained
    metadata = json.loads(safe_open(str(output), "pt").metadata()["irank"])
    assert metadata["refined"]["run"] == {"device": "cpu", "precision": precision, "channels_last": True}


def test_auto_workers_share_the_cpus_among_torchrun_processes(monkeypatch):
    from irank.model import inputs as data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda _pid: set(range(12)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.resolve_workers(None, []) == data.AUTO_WORKERS_CAP  # 12 CPUs, capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data.resolve_workers(None, []) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "12")
    assert data.resolve_workers(None, []) == 0  # one CPU each: decode in the process itself
    assert data.resolve_workers(5, []) == 5


def test_tensor_rows_get_no_workers_by_default(tmp_path):
    from irank.formats import synthetic
    from irank.formats.manifest import read_manifest
    from irank.model import inputs as data

    synthetic.make_embeddings(tmp_path, num_rows=20, dim=4, num_classes=2, noise=0.0, seed=0)
    assert data.resolve_workers(None, read_manifest(tmp_path / "train.csv").resolved_paths()) == 0


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_worker_count_is_one_line(cli, tiny_data, tiny_model, tmp_path, value):
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s.csv", "--num-workers", value)
    assert code != 0 and "--num-workers" in err and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()
