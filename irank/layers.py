"""Features at any named layer of a model, pooled to one vector per sample.

Conv maps (N, C, H, W) are pooled to [global average, global max] (2C numbers); token sequences
(N, T, C) to their mean over tokens; anything else is flattened. The forward pass stops right after
the layer, so features from the middle of a network cost less than a full pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import batches
from .errors import UsageError
from .features import check_finite
from .progress import Reporter


class _Stop(Exception):
    """Raised by the hook to end a forward pass once the wanted layer has run."""


def pool(output: torch.Tensor) -> torch.Tensor:
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


def run_until(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled output of `layer` for a batch, without running the rest of the model."""
    captured = {}

    def hook(_module, _inputs, output):
        captured["output"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "output" not in captured:
        raise UsageError("the chosen layer did not run during the forward pass")
    return pool(captured["output"].detach())


def layer_features(
    model: nn.Module,
    layer_name: str,
    loader: DataLoader,
    *,
    num_rows: int,
    device: torch.device,
    reporter: Reporter | None = None,
) -> torch.Tensor:
    """Pooled features of `layer_name` for every row of the loader, float32 on the CPU."""
    reporter = reporter or Reporter()
    layer = get_layer(model, layer_name)
    model.to(device).eval()
    features = None
    with torch.inference_mode(), reporter.task(f"features at {layer_name}", len(loader)) as advance:
        for images, rows in batches(loader):
            pooled = run_until(model, layer, images.to(device, non_blocking=True)).float().cpu()
            if features is None:
                features = torch.empty(num_rows, pooled.shape[1], dtype=torch.float32)
            features[rows] = pooled
            advance(1)
    check_finite(features, torch.zeros(num_rows, 1))
    return features


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
