"""Under torchrun (2 CPU processes, gloo) every command computes what one process computes.

Each test launches `python -m torch.distributed.run --standalone --nproc-per-node 2 -m irank ...` as a
subprocess (with a timeout, so a hang fails instead of blocking CI) and compares its files with an
in-process single-process run on the same tiny data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist

import irank

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available here")

PROCESSES = 2
TIMEOUT_SECONDS = 300  # far above a normal run (seconds); only a hang reaches it
# Relative to the largest score. Sums over rows are added in another order across processes, and a
# process's forward pass sees other batches, which may move float32 features by an ulp on some CPUs.
SCORE_TOLERANCE = 1e-5


def torchrun(*args, temporary_folder: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
               "-m", "irank", *map(str, args)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if temporary_folder is not None:
        environment["TMPDIR"] = str(temporary_folder)
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, env=environment)


def assert_same_scores(single: pd.DataFrame, sharded: pd.DataFrame) -> None:
    """Same rows and values to float tolerance; ranks identical except between scores that tie within it."""
    single, sharded = single.set_index("id"), sharded.set_index("id")
    assert sorted(single.index) == sorted(sharded.index)
    sharded = sharded.loc[single.index]
    scale = float(single["score"].abs().max())
    np.testing.assert_allclose(sharded["score"], single["score"], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE * scale)
    np.testing.assert_allclose(sharded["label_prob"], single["label_prob"], rtol=1e-5, atol=1e-7)
    assert (sharded["label"] == single["label"]).all()
    by_single_rank = single.sort_values("rank").index
    by_sharded_rank = sharded.sort_values("rank").index
    for first, second in zip(by_single_rank, by_sharded_rank):
        if first != second:  # a different order is only allowed between tied scores
            assert abs(single.loc[first, "score"] - single.loc[second, "score"]) <= SCORE_TOLERANCE * scale


@pytest.mark.parametrize("method, used, budget", [("auto", "joint-loss", "0"), ("loss", "loss", "1GiB"),
                                                  ("influence", "influence", "0")])
def test_score_equals_one_process(tiny_data, tiny_model, tmp_path, method, used, budget):
    """The default refit boundary: layer choice by 3-fold held-out loss on a sample of rows that spans both
    processes' blocks (gathered), the other rows read up to the chosen layer (through the head for the joint
    loss, the default, whose ranks are among every process's rows), probe fit, and the probe's loss or its
    influence (whose curvature is summed over the processes) on it; with
    `--memory-budget 0` every per-sample array, the gathered predictions included, on disk.
    (`--boundary head` is compared in the post-train test, whose rounds score on the head.)"""
    single = irank.score(tiny_model, tiny_data["train"], run_options=irank.RunOptions(device="cpu", batch_size=32),
                         boundary=irank.BoundaryOptions(choice_rows=100), method=method)
    assert "random sample of 100 rows" in single.sidecar["parameters"]["layer_choice"]
    output = tmp_path / "scores.csv"
    result = torchrun("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu", "--batch-size", 32,
                      "--choice-rows", 100, "--method", method, "--memory-budget", budget)
    assert result.returncode == 0, result.stderr
    assert_same_scores(single.table, pd.read_csv(output))
    sidecar = json.loads((tmp_path / "scores.csv.json").read_text())
    assert sidecar["parameters"]["layer"] == single.sidecar["parameters"]["layer"]
    assert sidecar["method"] == single.sidecar["method"] == used
    for name, figures in single.sidecar["parameters"]["layers"].items():
        assert sidecar["parameters"]["layers"][name]["memorized"] == figures["memorized"]
        assert sidecar["parameters"]["layers"][name]["agreement"] == pytest.approx(figures["agreement"], abs=0.01)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "scores.csv.json"]  # no temp file
    assert result.stderr.count("wrote ") == 1  # only rank 0 speaks


def test_a_bad_image_in_one_process_stops_every_process(tiny_data, tiny_model, tmp_path):
    table = pd.read_csv(tiny_data["train"])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad_row = len(table) - 3  # in the last process's block of rows
    table["path"] = [str(Path(tiny_data["folder"]) / p) for p in table["path"]]
    table.loc[bad_row, "path"] = str(tmp_path / "broken.png")
    manifest = tmp_path / "bad.csv"
    table.to_csv(manifest, index=False)
    output = tmp_path / "scores.csv"
    result = torchrun("score", tiny_model, manifest, "-o", output, "--boundary", "head", "--device", "cpu",
                      "--allow-outside-root")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("irank: error:")]
    assert len(errors) == 1, result.stderr
    assert f"row {bad_row + 1}" in errors[0] and "broken.png" in errors[0]
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".scores.csv")]


def test_refine_head_equals_one_process(tiny_data, tiny_model, tmp_path):
    from safetensors.torch import load_file

    options = dict(epochs=2, lr=0.05, seed=1)
    single = tmp_path / "single.safetensors"
    history = irank.refine(tiny_model, tiny_data["train"], output=str(single), val=tiny_data["test"],
                           train_options=irank.TrainOptions(scope="head", **options),
                           run_options=irank.RunOptions(device="cpu", batch_size=32)).history
    sharded = tmp_path / "sharded.safetensors"
    result = torchrun("refine", tiny_model, tiny_data["train"], "-o", sharded, "--scope", "head", "--epochs", 2,
                      "--lr", 0.05, "--seed", 1, "--val", tiny_data["test"], "--device", "cpu", "--batch-size", 32,
                      "--json")
    assert result.returncode == 0, result.stderr
    sharded_history = json.loads(result.stdout)["history"]  # rank 0's JSON only
    assert [r["val_accuracy"] for r in sharded_history] == [r["val_accuracy"] for r in history]
    assert [r["train_loss"] for r in sharded_history] == pytest.approx([r["train_loss"] for r in history], rel=1e-6)
    # Every batch of the one-process run, split by which process holds its rows: the same steps.
    expected, got = load_file(str(single)), load_file(str(sharded))
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert (expected[name] - got[name]).abs().max() <= 1e-5, name
    assert not (tmp_path / "sharded.safetensors.resume").exists()


def test_post_train_takes_the_same_decisions_as_one_process(tiny_data, tiny_model, tmp_path):
    """Two rounds of score (on the head) → prune → refit, the second on the first's kept rows and model."""
    arguments = ["--rounds", 2, "--step", 0.05]
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    irank.post_train(tiny_model, tiny_data["train"], out_dir=str(single), loop=irank.LoopOptions(rounds=2, step=0.05),
                     run_options=irank.RunOptions(device="cpu", batch_size=64))
    private = tmp_path / "tmp"
    private.mkdir()
    result = torchrun("post-train", tiny_model, tiny_data["train"], "--out-dir", sharded, *arguments,
                      "--device", "cpu", "--batch-size", 64, temporary_folder=private)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    for number in (1, 2):
        folder = f"round-{number:02d}"
        assert (sharded / folder / "kept.csv").read_bytes() == (single / folder / "kept.csv").read_bytes()
        removed = pd.read_csv(single / folder / "removed.csv")
        assert pd.read_csv(sharded / folder / "removed.csv")["id"].tolist() == removed["id"].tolist()
    assert_same_scores(pd.read_csv(single / "round-01" / "scores.csv"), pd.read_csv(sharded / "round-01" / "scores.csv"))
    rounds = [(r["removed"], r["kept"]) for r in json.loads((sharded / "summary.json").read_text())["rounds"]]
    assert rounds == [(r["removed"], r["kept"]) for r in json.loads((single / "summary.json").read_text())["rounds"]]
    assert not list(private.glob("irank-post-train-*"))  # the other process's private folder is gone


def test_post_train_rejudge_judges_like_one_process(tiny_data, tiny_model, tmp_path):
    """--rejudge's rounds and its final judgement, which every process runs on its own final.safetensors."""
    from irank.options import TrainOptions

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    irank.post_train(tiny_model, tiny_data["train"], out_dir=str(single),
                     loop=irank.LoopOptions(rounds=2, budget=0.1, strategy="rejudge", boundary="head"),
                     train_options=TrainOptions(scope="refit"),  # what the command gives: the rest acts on SGD only
                     run_options=irank.RunOptions(device="cpu", batch_size=64))
    private = tmp_path / "tmp"
    private.mkdir()
    result = torchrun("post-train", tiny_model, tiny_data["train"], "--out-dir", sharded, "--rejudge", "--rounds", 2,
                      "--budget", 0.1, "--boundary", "head", "--scope", "refit", "--device", "cpu", "--batch-size", 64,
                      temporary_folder=private)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in ("removed.csv", "round-02/removed.csv"):
        assert pd.read_csv(sharded / name)["id"].tolist() == pd.read_csv(single / name)["id"].tolist()
    assert_same_scores(pd.read_csv(single / "scores.csv"), pd.read_csv(sharded / "scores.csv"))
    judged = json.loads((sharded / "summary.json").read_text())["judgement"]
    assert (judged["removed"], judged["boundary"], judged["method"]) == (24, "head", "loss")
    assert not list(private.glob("irank-post-train-*"))



def test_post_train_unlearn_judges_like_one_process(tiny_data, tiny_model, tmp_path):
    """The default strategy: one fine-tune (split over the processes), then every row judged under it."""
    from irank.options import TrainOptions

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    irank.post_train(tiny_model, tiny_data["train"], out_dir=str(single), loop=irank.LoopOptions(budget=0.1),
                     train_options=TrainOptions(scope="head", epochs=2, lr=0.1, augment="none", loss="gce"),
                     run_options=irank.RunOptions(device="cpu", batch_size=64))
    private = tmp_path / "tmp"
    private.mkdir()
    result = torchrun("post-train", tiny_model, tiny_data["train"], "--out-dir", sharded, "--budget", 0.1,
                      "--scope", "head", "--epochs", 2, "--augment", "none", "--device", "cpu", "--batch-size", 64,
                      temporary_folder=private)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    assert pd.read_csv(sharded / "removed.csv")["id"].tolist() == pd.read_csv(single / "removed.csv")["id"].tolist()
    assert_same_scores(pd.read_csv(single / "scores.csv"), pd.read_csv(sharded / "scores.csv"))
    judged = json.loads((sharded / "summary.json").read_text())["judgement"]
    assert (judged["removed"], judged["boundary"], judged["method"]) == (24, "head", "aum-loss")
    assert not list(private.glob("irank-post-train-*"))



def interrupt_after(out: Path, keep_rounds: int | None = None) -> None:
    """Make `out` look like a post-train run stopped early: after `keep_rounds` rounds, or (None) an unlearn run
    stopped after its fine-tune, before its judgement."""
    state = json.loads((out / "summary.json").read_text())
    state.pop("finished")
    if keep_rounds is None:
        for key in ("judgement", "plan"):
            state.pop(key)
        for name in ("scores.csv", "scores.csv.json", "kept.csv", "kept.csv.json", "removed.csv"):
            (out / name).unlink()
    else:
        import shutil

        for record in state["rounds"][keep_rounds:]:
            shutil.rmtree(out / record["folder"])
        state["rounds"] = state["rounds"][:keep_rounds]
        state.pop("final_round")
        (out / "final.safetensors").unlink()
    (out / "summary.json").write_text(json.dumps(state))


@pytest.mark.parametrize("arguments, keep_rounds", [
    (["--rounds", 2, "--step", 0.05], 1),
    (["--budget", 0.1, "--scope", "head", "--epochs", 1, "--augment", "none"], None),
])
def test_post_train_resumed_under_torchrun_shares_rank_0s_files(tiny_data, tiny_model, tmp_path, arguments, keep_rounds):
    """A resumed run: the other process's private folder is new, so rank 0 sends it the last round's kept rows and
    model (gradual), or the fine-tuned model (unlearn), and the run ends as an uninterrupted one."""
    out, private = tmp_path / "post", tmp_path / "tmp"
    private.mkdir()
    command = ["post-train", tiny_model, tiny_data["train"], "--out-dir", out, *arguments, "--device", "cpu",
               "--batch-size", 64]
    assert (result := torchrun(*command, temporary_folder=private)).returncode == 0, result.stderr
    removed = pd.read_csv(out / "removed.csv")
    interrupt_after(out, keep_rounds)
    result = torchrun(*command, temporary_folder=private)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["finished"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "removed.csv"), removed)
    assert not list(private.glob("irank-post-train-*"))


SHARDED_MATH = '''
import sys
import torch
import torch.distributed as dist
from irank.core import influence
from irank.runtime.distributed import gather_objects, gather_rows_into, shard_of
from irank.core.linear import fit_softmax_regression, standardizer
from irank.runtime.memory import DiskRows

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
generator = torch.Generator().manual_seed(0)
rows, classes, dims = 101, 3, 5  # an odd count: blocks of 50 and 51 rows
features = torch.randn(rows, dims, generator=generator, dtype=torch.float64)
labels = torch.randint(0, classes, (rows,), generator=generator)
logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64)
shard = shard_of(rows)
mine = slice(shard.start, shard.stop)

def same(name, expected, got, tolerance=1e-9):
    expected, got = torch.as_tensor(expected), torch.as_tensor(got)
    error = float((expected - got).abs().max() / expected.abs().max().clamp_min(1e-300))
    if not error <= tolerance:
        raise SystemExit(f"{name}: relative difference {error:.3g} on rank {rank}")

for curvature in ("exact", "kfac"):
    for measure in influence.MEASURES:
        expected, _ = influence.influence_scores(logits, features, labels, measure=measure, curvature=curvature)
        got, _ = influence.influence_scores(logits[mine], features[mine], labels[mine], measure=measure,
                                            curvature=curvature, shard=shard)
        same(f"{curvature} {measure}", expected[mine], got)
for expected, got in zip(standardizer(features), standardizer(features[mine], shard)):
    same("standardizer", expected, got)
for expected, got in zip(fit_softmax_regression(features, labels, classes, l2=0.1),
                         fit_softmax_regression(features[mine], labels[mine], classes, l2=0.1, shard=shard)):
    same("probe fit", expected, got, tolerance=1e-6)
parts = gather_objects({"rows": features[mine]} if rank == 1 else {})  # uneven: nothing from rank 0
same("gather objects", features[mine.start if rank == 1 else 50:], parts[1]["rows"], tolerance=0)
assert parts[0] == {} and len(parts) == 2
same("gather", logits, shard.gather(logits[mine]), tolerance=0)
local = DiskRows(shard.local, classes, dtype=torch.float64).index_copy_(0, torch.arange(shard.local), logits[mine])
for values in (logits[mine], local):
    for out in (torch.full((rows, classes), float("nan"), dtype=torch.float64), DiskRows(rows, classes, dtype=torch.float64)):
        got = gather_rows_into(values, rows, out, chunk_rows=7)  # several chunks from each process, a short one last
        same("gather into", logits, got[0:rows], tolerance=0)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)  # as irank's CLI does under torchrun: no interpreter teardown while gloo's threads hold tensors
'''


def test_sharded_math_equals_one_process_on_uneven_blocks(tmp_path):
    """Curvature, influence measures, standardization, the probe fit and the gathers, rows split 50/51."""
    script = tmp_path / "sharded_math.py"
    script.write_text(SHARDED_MATH)
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "rendezvous")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
                 for rank in range(PROCESSES)]
    outcomes = [process.communicate(timeout=TIMEOUT_SECONDS) for process in processes]
    for process, (_, errors) in zip(processes, outcomes):
        assert process.returncode == 0, errors
