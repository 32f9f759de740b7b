"""Built-in architectures: small CNNs for the demo, the tests and CPU benchmarks.

Any torchvision classification model works by name too (`--arch resnet18`); these exist so that
irank can train and score something real in seconds on a laptop CPU.
"""

from __future__ import annotations

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
