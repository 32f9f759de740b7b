"""Features at any named layer of a model, pooled to one vector per sample.

Conv maps (N, C, H, W) are pooled to [global average, global max] (2C numbers); token sequences
(N, T, C) to their mean over tokens; vectors (N, D), such as an MLP's hidden layers, are kept as they
are; anything else is flattened. The forward pass stops right after
the layer, so features from the middle of a network cost less than a full pass.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from irank.model.forward import check_finite
from irank.model.inputs import batches
from irank.model.placement import Placement
from irank.model.transfer import HostRows
from irank.runtime.errors import UsageError
from irank.runtime.memory import MemoryBudget
from irank.runtime.progress import Reporter


class _Stop(Exception):
    """Raised by the hook to end a forward pass once the wanted layer has run."""


def pool(output: torch.Tensor) -> torch.Tensor:
    if output.dim() == 4 and output.shape[2] * output.shape[3] == 1:
        return output.reshape(len(output), -1)  # already pooled: average and max would be the same numbers
    if output.dim() == 4:
        return torch.cat([output.mean(dim=(2, 3)), output.amax(dim=(2, 3))], dim=1)
    if output.dim() == 3:
        return output.mean(dim=1)
    return output.reshape(len(output), -1)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UsageError(f"--layer {name}: no such module; `irank layers CHECKPOINT` lists the candidates") from None


def run_until(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled outputs of `layers` (name → module) for a batch, stopping once the last of them has run."""
    captured: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(_module, _inputs, output):
            output = output[0] if isinstance(output, (tuple, list)) else output
            captured[name] = pool(output.detach())
            if len(captured) == len(layers):
                raise _Stop
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    try:
        model(images)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in captured]
    if missing:
        raise UsageError(f"--layer {missing[0]}: the module did not run during the forward pass")
    return captured


def layer_features(
    model: nn.Module,
    layer_names: list[str] | str,
    loader: DataLoader,
    *,
    num_rows: int,
    device: "torch.device | Placement",
    reporter: Reporter | None = None,
    row_order: "np.ndarray | list[int] | range | None" = None,
    first_row: int = 0,
    out: torch.Tensor | dict[str, torch.Tensor] | None = None,
    budget: MemoryBudget | None = None,
) -> dict[str, torch.Tensor] | torch.Tensor:
    """Pooled features of each named layer for every row of the loader (float32, CPU), in one pass.

    Given one name (a str), returns its tensor; given a list, a dict name → tensor. Row i of the
    result is manifest row i, or, with `row_order` (the manifest rows the loader covers), row_order[i]; a
    `range` of rows (this process's block) is read without a table of each row's position.
    `first_row`: the manifest row of the loader's row 0, for messages (a process's shard under torchrun).
    `out`: a tensor to fill in place of a new one (one layer), or a dict name → tensor (any of the layers);
    rows the loader does not cover keep their values. `budget`: where new per-sample arrays go (default: memory). `device`: a device, or a
    `Placement` (memory format and precision too).
    """
    budget = budget or MemoryBudget()
    reporter = reporter or Reporter()
    single = isinstance(layer_names, str)
    names = [layer_names] if single else list(layer_names)
    layers = {name: get_layer(model, name) for name in names}
    position, offset = None, 0
    if isinstance(row_order, range):  # contiguous rows (this process's block): no table of positions
        num_rows, offset = len(row_order), row_order.start
    elif row_order is not None:
        order = torch.as_tensor(np.asarray(row_order, dtype=np.int64))
        num_rows = len(order)
        position = torch.full((int(order.max()) + 1,), -1, dtype=torch.long)
        position[order] = torch.arange(num_rows)
    place = Placement.of(device)
    place.place_model(model).eval()
    features: dict[str, torch.Tensor] = {}
    with torch.inference_mode(), place.autocast(), \
            reporter.task(f"features at {', '.join(names)}", len(loader)) as advance, HostRows(place.device) as host:
        for images, rows in batches(loader):
            where = rows - offset if position is None else position[rows]
            writes = []
            for name, pooled in run_until(model, layers, place.inputs(images)).items():
                if name not in features:
                    given = out.get(name) if isinstance(out, dict) else out
                    features[name] = given if given is not None else budget.array(num_rows, pooled.shape[1])
                writes.append((features[name], where, pooled))
            host.put(writes)
            advance(1)
    for tensor in features.values():
        check_finite(tensor, None, first_row, row_order)
    return features[names[0]] if single else features


def candidate_layers(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, module type, output shape, pooled size) of every module whose output is a tensor, in run order."""
    found: list[tuple[str, str, tuple[int, ...], int]] = []
    handles = []

    def make_hook(name):
        def hook(module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() >= 2:
                found.append((name, type(module).__name__, tuple(output.shape[1:]), pool(output).shape[1]))
        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with torch.inference_mode():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return found


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise UsageError(f"--input-shape {text!r}: expected positive whole numbers separated by commas, e.g. 64 or 1,40,100")
    return tuple(int(part) for part in parts)


def dummy_input(model: nn.Module, meta: dict, image_size: int | None = None,
                input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """One all-zero sample to trace shapes with: of `input_shape`, else the row shape the checkpoint was
    trained on (tensor rows), else a built-in vector model's width, else a square RGB image."""
    from irank.model.architectures import MLP

    shape = input_shape or meta.get("input_shape")
    if shape:
        return torch.zeros(1, *shape)
    if isinstance(model, MLP):
        return torch.zeros(1, model.in_features)
    size = image_size or (meta.get("preprocess") or {}).get("image_size") or 224
    return torch.zeros(1, 3, size, size)


def list_layers(checkpoint_path: str, options, image_size: int | None = None,
                input_shape: tuple[int, ...] | None = None) -> list[dict]:
    """Every module of a checkpoint's model with its output shape on a dummy input, and whether --layer auto tries it."""
    from irank.formats.manifest import read_classes_file
    from irank.model.checkpoint import build_model, find_head, load_weights, read_checkpoint, resolve_arch
    from irank.model.layers import block_candidates

    checkpoint = read_checkpoint(checkpoint_path)
    meta = checkpoint.metadata
    classes = meta.get("classes") or (read_classes_file(options.classes) if options.classes else None)
    if not classes:
        raise UsageError(f"checkpoint {checkpoint_path} has no class list in irank metadata: pass --classes")
    arch = resolve_arch(options.arch, checkpoint)
    model = with_probe(build_model(arch, len(classes)), meta, len(classes))
    load_weights(model, checkpoint, arch)
    head_name, _ = find_head(model, options.head or meta.get("head"))
    candidates = set(block_candidates(model, head_name))
    example = dummy_input(model, meta, image_size, input_shape)
    try:
        traced = candidate_layers(model, example)
    except RuntimeError as exc:
        raise UsageError(f"checkpoint {checkpoint_path}: the model does not run on a dummy input of shape "
                         f"{tuple(example.shape[1:])} ({str(exc).splitlines()[0][:160]}); pass --input-shape "
                         "(tensor rows) or --image-size") from None
    return [
        {"name": name, "type": kind, "shape": list(shape), "pooled": pooled, "candidate": name in candidates}
        for name, kind, shape, pooled in traced
    ]


def with_probe(model: nn.Module, metadata: dict, num_classes: int) -> nn.Module:
    """The model a checkpoint holds: `model` itself, or cut at a layer with a probe head when refine wrote it so."""
    probe = metadata.get("probe")
    return ProbeModel(model, probe["layer"], probe["in_features"], num_classes) if probe else model


class ProbeModel(nn.Module):
    """A network cut at `layer`, its pooled output fed to a linear head `probe`: a real classifier that
    `eval` and `score` run like any other (irank metadata key "probe" says how to rebuild it)."""

    def __init__(self, backbone: nn.Module, layer: str, in_features: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.layer = layer
        self.probe = nn.Linear(in_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = run_until(self.backbone, {self.layer: get_layer(self.backbone, self.layer)}, images)[self.layer]
        return self.probe(features)


# Modules that only reshape or gate what flows through them are never a layer worth probing on their own.
PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Dropout, nn.Identity, nn.Flatten, nn.BatchNorm2d, nn.BatchNorm1d)


MAX_AUTO_CANDIDATES = 5


def block_candidates(model: nn.Module, head_name: str) -> list[str]:
    """The blocks of a network, shallow to deep: direct children, or the children of a direct child that
    is a Sequential/ModuleList (e.g. `features.3`), without pass-through modules and the head. The last
    MAX_AUTO_CANDIDATES are kept: early blocks carry too little class structure to probe."""
    names = []
    for child_name, child in model.named_children():
        if child_name == head_name:
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            names += [f"{child_name}.{sub}" for sub, module in child.named_children() if not isinstance(module, PASS_THROUGH)]
        elif not isinstance(child, PASS_THROUGH):
            names.append(child_name)
    return names[-MAX_AUTO_CANDIDATES:]
