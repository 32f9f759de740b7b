"""Checkpoints: load a model from safetensors or a weights-only .pt, save safetensors with metadata.

irank's metadata (JSON under the safetensors metadata key "irank") carries what later stages need:
architecture, class list, head name and preprocessing, so `score` and `eval` run with no extra flags.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from irank.formats.files import atomic_path
from irank.formats.jsontext import JsonError
from irank.formats.jsontext import kind as json_kind
from irank.formats.jsontext import parse as parse_json
from irank.model.architectures import BUILTIN_ARCHS, VECTOR_ARCHS, vector_model
from irank.runtime.errors import CheckpointError, UsageError

METADATA_KEY = "irank"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """Tensors and irank metadata read from a checkpoint file, before any model is built."""

    path: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def read_checkpoint(path: str) -> Checkpoint:
    file = Path(path)
    if not file.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as handle:
                raw_meta = handle.metadata() or {}
                state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
        metadata = parse_metadata(raw_meta.get(METADATA_KEY), path)
        return Checkpoint(str(path), _strip_prefixes(state_dict), metadata)
    if file.suffix in (".pt", ".pth", ".bin"):
        try:
            loaded = torch.load(str(file), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
            raise CheckpointError(
                f"checkpoint {path}: refused: it is not a plain weights file and irank loads .pt files with "
                f"weights_only=True only ({first[:200]}); save the state_dict, or convert it to safetensors"
            ) from None
        except (RuntimeError, OSError, EOFError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot read ({str(exc).splitlines()[0][:200]})") from None
        if isinstance(loaded, dict):
            for key in WRAPPER_KEYS:
                if isinstance(loaded.get(key), dict):
                    loaded = loaded[key]
                    break
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CheckpointError(f"checkpoint {path}: expected a state dict (names → tensors)")
        return Checkpoint(str(path), _strip_prefixes(dict(loaded)), {})
    raise CheckpointError(f"checkpoint {path}: unknown format {file.suffix!r}; use .safetensors, .pt or .pth")


# The keys of irank's metadata that later stages read, and the JSON types each must have.
METADATA_TYPES = {"arch": str, "classes": list, "head": str, "preprocess": dict, "input_shape": list, "probe": dict}


def parse_metadata(text: str | None, path: str) -> dict:
    """irank's metadata of a safetensors checkpoint, checked for the types later stages rely on: the file is
    someone else's data, so a wrong shape is a one-line error, not a traceback deep in a stage."""
    if text is None:
        return {}
    try:
        metadata = parse_json(text, allow_nan=True)  # irank's own files may hold a diverged loss (NaN)
    except JsonError as exc:
        raise CheckpointError(f"checkpoint {path}: its irank metadata is not valid JSON ({exc.where()}: "
                              f"{exc.message})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {path}: its irank metadata is {json_kind(metadata)}, not a JSON object")
    for key, kind in METADATA_TYPES.items():
        if metadata.get(key) is not None and not isinstance(metadata[key], kind):
            raise CheckpointError(f"checkpoint {path}: irank metadata key {key!r} is not a JSON {kind.__name__}")
    if not all(isinstance(name, (str, int)) and not isinstance(name, bool) for name in metadata.get("classes") or []):
        raise CheckpointError(f"checkpoint {path}: irank metadata key 'classes' must list class names")
    probe = metadata.get("probe") or {}
    if probe and not (isinstance(probe.get("layer"), str) and type(probe.get("in_features")) is int):
        raise CheckpointError(f"checkpoint {path}: irank metadata key 'probe' needs a layer name and in_features")
    return metadata


def names_code(arch: str) -> bool:
    """Whether an architecture name is Python code to run ('module:factory' or 'file.py:factory')."""
    return ":" in arch


def resolve_arch(given: str | None, checkpoint: Checkpoint | None) -> str:
    """The architecture to build: `given` (--arch) when there is one, else the checkpoint's metadata.

    A checkpoint is data, never code: its metadata may name irank's built-ins and torchvision models, and a
    name that would import a module or run a file is refused; code runs only when the user names it.
    """
    if given:
        return given
    stored = checkpoint.metadata.get("arch") if checkpoint is not None else None
    if checkpoint is None:
        raise UsageError("--arch is needed to build a model")
    if not stored:
        raise UsageError(f"checkpoint {checkpoint.path} has no irank metadata naming its architecture: pass --arch "
                         "(a torchvision model name such as resnet18, a built-in such as small-cnn, or module:factory)")
    if names_code(stored):
        raise CheckpointError(
            f"checkpoint {checkpoint.path}: its metadata names the architecture {stored!r}, which is Python code; "
            f"irank runs code only when you name it: pass --arch {stored} if you trust it (a checkpoint irank "
            "wrote from your own architecture needs --arch again)")
    return stored


def _call_factory(factory, num_classes: int, spec: str) -> nn.Module:
    try:
        model = factory(num_classes=num_classes)
    except TypeError:
        model = factory()
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {spec}: the factory returned {type(model).__name__}, not a torch nn.Module")
    return model


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A fresh model: a built-in name (`small-cnn`, `mlp-64-128`, ...), a torchvision model name,
    `module.path:factory` or `file.py:factory`."""
    if arch in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[arch](num_classes)
    try:
        model = vector_model(arch, num_classes)
    except ValueError as exc:
        raise CheckpointError(f"--arch {arch}: {exc}") from None
    if model is not None:
        return model
    if ":" in arch:
        location, _, factory_name = arch.rpartition(":")
        try:
            if location.endswith(".py"):
                if not Path(location).is_file():
                    raise CheckpointError(f"--arch {arch}: no such file {location}")
                spec = importlib.util.spec_from_file_location(Path(location).stem, location)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(location)
        except CheckpointError:
            raise
        except Exception as exc:  # the user's own code failed to import
            raise CheckpointError(f"--arch {arch}: cannot import {location}: {type(exc).__name__}: {exc}") from None
        factory = getattr(module, factory_name, None)
        if factory is None:
            raise CheckpointError(f"--arch {arch}: {location} has no attribute {factory_name!r}")
        return _call_factory(factory, num_classes, arch)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, list(BUILTIN_ARCHS) + known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CheckpointError(
            f"--arch {arch}: not a built-in ({', '.join(BUILTIN_ARCHS)}, {VECTOR_ARCHS}), torchvision model, "
            f"'module:factory' or 'file.py:factory'{hint}"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _shorten(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_weights(model: nn.Module, checkpoint: Checkpoint, arch: str) -> None:
    """Load tensors into the model, or say exactly which keys do not fit."""
    expected = model.state_dict()
    given = checkpoint.state_dict
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key} {tuple(given[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in given and given[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_shorten(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch (checkpoint vs model) {_shorten(mismatched, 2)}")
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint.path} does not fit --arch {arch}: " + "; ".join(problems))
    model.load_state_dict(given, strict=True)


def find_head(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier head: the module named `name`, else the last nn.Linear in the model."""
    if name:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise CheckpointError(f"--head {name}: no such module (linear layers: {_shorten(linears, 6) or 'none'})") from None
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"--head {name}: is a {type(module).__name__}, not an nn.Linear")
        return name, module
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CheckpointError("the model has no nn.Linear layer to use as the head; name one with --head")
    return linears[-1]


def save_checkpoint(model: nn.Module, path: str, metadata: dict) -> None:
    """Write the model's weights as safetensors with irank metadata, atomically."""
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
