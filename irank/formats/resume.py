"""Resumable training: after every epoch, `OUT.resume` holds what the next epoch needs.

The file is safetensors (model and optimizer tensors, the best epoch's weights, RNG states) with the
rest (epoch, step, history, a fingerprint of the inputs and options) as JSON in its metadata: nothing
in it is executed when it is read. It is written atomically and removed once OUT is written.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from irank.formats.files import atomic_path
from irank.runtime.errors import UsageError

INFO_KEY = "irank_resume"


def resume_path(output: str) -> Path:
    return Path(str(output) + ".resume")


@dataclass
class TrainingState:
    """Where training stopped: tensors by name (model.*, best.*, optim.*, rng.*) and the rest as JSON."""

    tensors: dict[str, torch.Tensor]
    info: dict  # epoch, step, history, best_epoch, best_accuracy


@dataclass
class Resume:
    """The resume file of one output: `resume` says whether to continue from it; `fingerprint` must match."""

    path: Path
    fingerprint: str
    resume: bool = False

    def load(self) -> TrainingState | None:
        if not self.resume or not self.path.exists():
            return None
        try:
            tensors = load_file(str(self.path))
            info = self._info()
        except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError, SafetensorError) as exc:
            raise UsageError(f"--resume: cannot read {self.path} ({exc}); delete it to start afresh") from None
        if info.get("fingerprint") != self.fingerprint:
            raise UsageError(f"--resume: {self.path} was saved by a run with other inputs or options; "
                             "repeat the original command, or drop --resume to start afresh")
        return TrainingState(tensors, info)

    def _info(self) -> dict:
        with open(self.path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            metadata = json.loads(handle.read(header_size)).get("__metadata__", {})
        return json.loads(metadata[INFO_KEY])

    def matches(self) -> bool:
        """Whether the file exists, can be read and was saved by a run with the same inputs and options."""
        try:
            return self._info().get("fingerprint") == self.fingerprint
        except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError):
            return False

    def save(self, state: TrainingState) -> None:
        info = {**state.info, "fingerprint": self.fingerprint}
        tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.tensors.items()}
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={INFO_KEY: json.dumps(info, sort_keys=True)})

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def pack_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"optim.{index}.{key}": value for index, entry in optimizer.state_dict()["state"].items()
            for key, value in entry.items() if isinstance(value, torch.Tensor)}


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
