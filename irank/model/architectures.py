"""Built-in architectures: small CNNs for the demo, the tests and CPU benchmarks, and MLPs for vectors.

Any torchvision classification model works by name too (`--arch resnet18`); these exist so that
irank can train and score something real in seconds on a laptop CPU. `mlp-IN-HIDDEN` and `linear-IN`
take tensor rows of IN values (precomputed embeddings, tabular features) with no user code.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """`len(widths)` conv blocks (conv-BN-ReLU-maxpool), global average pooling, one linear head `fc`."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 256), in_channels: int = 3):
        super().__init__()
        blocks = []
        channels = in_channels
        for width in widths:
            blocks.append(conv_block(channels, width))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, images):
        return self.fc(self.flatten(self.pool(self.features(images))))


BUILTIN_ARCHS = {
    "tiny-cnn": lambda num_classes: SmallCNN(num_classes, widths=(8, 16, 32)),
    "small-cnn": lambda num_classes: SmallCNN(num_classes, widths=(32, 64, 128, 256)),
}


class VectorInput(nn.Module):
    """The vectors as given, flattened to (n, D) float32: a layer of its own so that `--layer input`
    (and `--layer auto`) can probe the embeddings themselves, which never saw the labels."""

    def forward(self, values):
        return values.reshape(len(values), -1).float()


class HiddenLayer(nn.Module):
    """Linear then ReLU, as one module: `--layer hiddenK` reads its activations."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, values):
        return torch.relu(self.linear(values))


class MLP(nn.Module):
    """Vectors of `in_features` values → `hidden1`, `hidden2`, ... (Linear + ReLU each) → the linear head `fc`.

    With no hidden widths it is a linear classifier (`linear-IN`).
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        self.in_features = in_features
        self.input = VectorInput()
        self.hidden_names = []
        width = in_features
        for number, size in enumerate(hidden, start=1):
            name = f"hidden{number}"
            self.add_module(name, HiddenLayer(width, size))
            self.hidden_names.append(name)
            width = size
        self.fc = nn.Linear(width, num_classes)

    def forward(self, values):
        values = self.input(values)
        for name in self.hidden_names:
            values = getattr(self, name)(values)
        return self.fc(values)


VECTOR_ARCHS = "mlp-IN, mlp-IN-HIDDEN[-HIDDEN...], linear-IN"
MLP_DEFAULT_HIDDEN = 256


def parse_vector_arch(arch: str) -> tuple[int, tuple[int, ...]] | None:
    """`mlp-IN[-HIDDEN...]` or `linear-IN` → (input width, hidden widths); None for other names.

    Raises ValueError for a name of this family that does not parse.
    """
    family, _, widths_text = arch.partition("-")
    if family not in ("mlp", "linear") or not widths_text:
        return None
    parts = widths_text.split("-")
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"widths must be positive whole numbers ({VECTOR_ARCHS}, e.g. mlp-64-128)")
    widths = [int(part) for part in parts]
    if family == "linear":
        if len(widths) != 1:
            raise ValueError("linear-IN takes one width, the input's (use mlp-IN-HIDDEN for hidden layers)")
        return widths[0], ()
    return widths[0], tuple(widths[1:]) or (MLP_DEFAULT_HIDDEN,)


def vector_model(arch: str, num_classes: int) -> MLP | None:
    parsed = parse_vector_arch(arch)
    return None if parsed is None else MLP(parsed[0], parsed[1], num_classes)
