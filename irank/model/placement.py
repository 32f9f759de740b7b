"""How a model runs: on which device, in which memory format, at which precision.

Channels-last (NHWC) lets the convolution kernels of oneDNN (CPU) and cuDNN (GPU) skip the layout
conversions that the default NCHW layout costs: the CIFAR benchmark's small-cnn (32–256 channels) runs
a batch of 256 1.75× faster on CPU in it, with the same results to float rounding. Narrow convolutions
gain nothing: the demo's tiny-cnn (8–32 channels) ran 9% slower in it (the whole demo: 22.9 s against
21.0 s). So `auto` turns it on for models whose widest 2-d convolution has at least WIDE_CHANNELS
output channels (every torchvision CNN); other models are left as they are.

Autocast (`--precision bf16|fp16`) runs the matrix products in half precision. `auto` uses bf16 on a
CUDA device that supports it and full precision elsewhere: on CPUs without bf16 units it is slower,
and every per-sample array irank keeps is float32 whatever the precision of the pass.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from irank.runtime.errors import UsageError

CHANNELS_LAST = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


WIDE_CHANNELS = 64


def has_wide_convolutions(model: nn.Module) -> bool:
    """Does the model have a 2-d convolution with at least WIDE_CHANNELS output channels?"""
    return any(isinstance(module, nn.Conv2d) and module.out_channels >= WIDE_CHANNELS for module in model.modules())


@dataclass(frozen=True)
class Placement:
    """A device, a memory format and an autocast precision (None: full precision)."""

    device: torch.device
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def of(cls, where: "Placement | torch.device") -> "Placement":
        """A placement as given, or a bare device's: default layout, full precision."""
        return where if isinstance(where, Placement) else cls(where)

    def place_model(self, model: nn.Module) -> nn.Module:
        """The model on the device, in the memory format (its parameters are converted in place)."""
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last and batch.dim() == 4:
            return batch.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(self.device, non_blocking=True)

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


def validate_placement(channels_last: str, precision: str) -> None:
    if channels_last not in CHANNELS_LAST:
        raise UsageError(f"--channels-last {channels_last}: choose from {', '.join(CHANNELS_LAST)}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")


def resolve_placement(model: nn.Module, device: str = "auto", channels_last: str = "auto",
                      precision: str = "auto") -> Placement:
    """The placement a run uses for `model`: `auto` settings resolved for its device and layers."""
    validate_placement(channels_last, precision)
    where = resolve_device(device)
    if precision == "auto":
        dtype = torch.bfloat16 if where.type == "cuda" and torch.cuda.is_bf16_supported() else None
    elif precision == "fp32":
        dtype = None
    else:
        dtype = _DTYPES[precision]
    return Placement(where, channels_last={"on": True, "off": False}.get(channels_last, has_wide_convolutions(model)),
                     autocast_dtype=dtype)


def placement_for(run, model: nn.Module) -> Placement:
    """Where and how `model` runs in a run with these RunOptions: device, memory format, precision."""
    return resolve_placement(model, run.device, run.channels_last, run.precision)
