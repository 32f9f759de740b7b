"""A post-train run's --out-dir: what it holds, checking the inputs before it is touched, starting afresh or
resuming from its summary.json, and leaving nothing behind when a run fails before it has anything to resume."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from irank._version import __version__
from irank.formats.files import remove_path, sha256_file, write_json_atomic
from irank.formats.manifest import check_inside_root, encode_labels, manifest_sha256, read_manifest
from irank.formats.summary import Summary
from irank.model.prepare import check_same_input, prepare
from irank.options import LoopOptions, ModelOptions, TrainOptions
from irank.runtime.distributed import all_or_none, broadcast_object, is_main
from irank.runtime.errors import UsageError

OWN_FILES = ("summary.json", "final.safetensors", "removed.csv", "scores.csv", "scores.csv.json", "kept.csv",
             "kept.csv.json",  # these four: the final judgement of --rejudge and unlearn
             "final.safetensors.resume",  # unlearn's fine-tune, after each epoch
             "margins.safetensors",  # its margins
             *(f"fold{k}{suffix}" for k in (0, 1)  # crossfit's halves and their fine-tunes
               for suffix in (".csv", ".csv.json", ".safetensors", ".safetensors.resume")))


def own_entries(out_dir: Path) -> list[Path]:
    """What a post-train run writes into its folder: its summary, final model, removed.csv and round folders."""
    entries = [out_dir / name for name in OWN_FILES if (out_dir / name).exists()]
    return entries + sorted(out_dir.glob("round-[0-9][0-9]*")) + sorted(out_dir.glob(".round-*.tmp"))


def started(out_dir: Path) -> bool:
    """Whether a run in `out_dir` has work to resume: a finished round, or an epoch of a fine-tune (unlearn's,
    or one of crossfit's)."""
    try:
        state = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        state = {}
    finished = isinstance(state, dict) and (state.get("rounds") or state.get("folds") or "unlearned" in state)
    resumable = ("final.safetensors.resume", "fold0.safetensors.resume", "fold1.safetensors.resume")
    return bool(finished) or any((out_dir / name).exists() for name in resumable)


@contextlib.contextmanager
def undone_unless_started(out_dir: Path) -> Iterator[None]:
    """A run that fails before it has anything to resume leaves nothing behind: the --out-dir it created is
    removed, and in a folder that was there before, the files it wrote (a summary.json that would refuse the
    corrected command as 'a run with other inputs')."""
    existed = out_dir.exists()
    before = set(out_dir.iterdir()) if existed and out_dir.is_dir() else set()
    try:
        yield
    except BaseException as error:
        if out_dir.is_dir() and started(out_dir):
            if isinstance(error, KeyboardInterrupt):  # what the CLI's one line says
                error.irank_note = f"--out-dir {out_dir} keeps what finished: run the same command again to resume"
            raise
        if out_dir.is_dir() and not existed:
            shutil.rmtree(out_dir, ignore_errors=True)
        elif out_dir.is_dir():
            for entry in set(out_dir.iterdir()) - before:
                remove_path(entry)
        raise


@contextlib.contextmanager
def building(folder: Path) -> Iterator[Path]:
    """A round (or the judgement) is built in a hidden folder; on any failure (Ctrl-C included) it is removed,
    so no half of one remains."""
    folder.mkdir()
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def check_inputs_outside_run(out_dir: Path, inputs: dict[str, str | None]) -> None:
    """Refuse an input that is one of the run's own files (e.g. an earlier final.safetensors), which a run replaces."""
    owned = [os.path.realpath(entry) for entry in own_entries(out_dir)]
    for name, path in inputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if any(real == entry or real.startswith(entry + os.sep) for entry in owned):
            raise UsageError(f"the {name} {path} is one of the files post-train writes in --out-dir {out_dir}; "
                             "copy it elsewhere first or use another --out-dir")


def check_inputs(checkpoint: str, manifest: str, val: str | None, model_options: ModelOptions):
    """Everything about the inputs that can be checked before --out-dir is touched: the manifests read, the
    checkpoint builds and fits them, --val holds the same kind of rows. A run refused here leaves no trace.
    Returns the input manifest."""
    prepared = prepare(checkpoint, manifest, model_options)
    if val:
        held_out = read_manifest(val)
        if not model_options.allow_outside_root:
            check_inside_root(held_out)
        check_same_input(prepared.input_shape, held_out, "--val")
        encode_labels(held_out, prepared.classes)
    return prepared.manifest


def load_state(out_dir: Path, config: dict, overwrite: bool) -> Summary | None:
    """The record of an earlier run of the same command in `out_dir` (to resume), or None to start afresh.

    A run with other inputs or parameters, or post-train files without a summary, is replaced only
    with `overwrite`; `overwrite` always starts afresh.
    """
    summary_path = out_dir / "summary.json"
    if overwrite:
        for entry in own_entries(out_dir):
            remove_path(entry)
        return None
    if not summary_path.exists():
        # Round folders without a summary are a first round cut short after its rename: rebuilt below.
        leftovers = [out_dir / name for name in OWN_FILES if (out_dir / name).exists()]
        if leftovers:
            raise UsageError(f"--out-dir {out_dir}: holds {leftovers[0].name} but no summary.json to resume from; "
                             "pass --overwrite to replace it, or use another --out-dir")
        return None
    try:
        state = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"--out-dir {out_dir}: cannot read summary.json ({exc}); pass --overwrite to start afresh") from None
    if not isinstance(state, dict) or state.get("config") != config:
        raise UsageError(
            f"--out-dir {out_dir} holds a post-train run with other inputs or parameters; "
            "repeat the original command to resume, use another --out-dir, or pass --overwrite to start afresh"
        )
    return Summary.from_dict(state, f"--out-dir {out_dir}: summary.json")


def run_config(checkpoint: str, manifest: str, val: str | None, loop: LoopOptions, train_options: TrainOptions,
               model_options: ModelOptions) -> dict:
    """What a run in --out-dir was made from: a later run resumes it only when this is the same."""
    return {
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "manifest": {"path": str(manifest), "sha256": manifest_sha256(manifest)},
        "val": {"path": str(val), "sha256": manifest_sha256(val)} if val else None,
        "loop": asdict(loop),
        "train": asdict(train_options),
        "model": asdict(model_options),
    }


def start(out: Path, checkpoint: str, manifest: str, val: str | None, config: dict, model_options: ModelOptions,
          overwrite: bool) -> tuple[Summary, int]:
    """The run's record (an earlier run's to resume, or a fresh one; under torchrun rank 0's for every process) and
    the number of input rows, once the inputs are checked."""
    with all_or_none():
        check_inputs_outside_run(out, {"checkpoint": checkpoint, "manifest": manifest, "--val": val,
                                       "--classes file": model_options.classes})
        original = check_inputs(checkpoint, manifest, val, model_options)
        out.mkdir(parents=True, exist_ok=True)
        state = load_state(out, config, overwrite) or Summary(irank_version=__version__, config=config)
    return broadcast_object(state), len(original)


def save_state(out: Path, state: Summary) -> None:
    with all_or_none():
        if is_main():  # a private folder of another torchrun process needs no summary
            write_json_atomic(out / "summary.json", state.to_dict())
