"""Small generated image data sets with known label noise: for the demo, the tests and quick checks.

Each class is a shape (disk, square, ring, cross, stripes, ...) drawn in a random colour at a random
place and size on a random background, with pixel noise. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SHAPES = ("disk", "square", "ring", "cross", "hstripes", "vstripes", "triangle", "diagonal")


def _mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = rng.uniform(0.22, 0.4) * size
    cy, cx = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    if shape == "ring":
        distance = np.sqrt(dy**2 + dx**2)
        return (distance <= radius) & (distance >= radius * 0.55)
    if shape == "cross":
        arm = radius * 0.3
        return ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))
    period = max(3.0, size / rng.uniform(3.0, 5.0))
    phase = rng.uniform(0, period)
    if shape == "hstripes":
        return ((yy + phase) % period) < period / 2
    if shape == "vstripes":
        return ((xx + phase) % period) < period / 2
    if shape == "triangle":
        return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    return ((xx + yy + phase) % period) < period / 2  # diagonal stripes


def make_image(shape: str, size: int, rng: np.random.Generator, pixel_noise: float) -> np.ndarray:
    background = rng.uniform(0, 1, 3)
    foreground = (background + rng.uniform(0.35, 0.65, 3)) % 1.0
    image = np.where(_mask(shape, size, rng)[:, :, None], foreground, background)
    image = image + rng.normal(0, pixel_noise, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def flip_labels(labels: np.ndarray, num_classes: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric noise: a `rate` share of labels (exactly rounded) moved to a uniformly chosen other class."""
    noisy = labels.copy()
    chosen = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, len(chosen))) % num_classes
    return noisy


def make_dataset(
    folder: str | Path,
    *,
    num_classes: int = 4,
    train_size: int = 400,
    test_size: int = 200,
    noise: float = 0.2,
    image_size: int = 16,
    pixel_noise: float = 0.1,
    seed: int = 0,
    shapes: tuple[str, ...] | None = None,
) -> tuple[Path, Path]:
    """Write PNG images and two manifests: train.csv (noisy `label`, clean `true_label`) and test.csv (clean).

    The classes are `shapes` if given, else the first `num_classes` of SHAPES.
    """
    classes = tuple(shapes) if shapes else SHAPES[:num_classes]
    num_classes = len(classes)
    if num_classes < 2 or not set(classes) <= set(SHAPES):
        raise ValueError(f"choose 2 to {len(SHAPES)} classes among {', '.join(SHAPES)}")
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    manifests = []
    for split, size in (("train", train_size), ("test", test_size)):
        truth = np.arange(size) % num_classes
        rng.shuffle(truth)
        given = flip_labels(truth, num_classes, noise, rng) if split == "train" else truth
        rows = []
        for index, (true_label, label) in enumerate(zip(truth, given)):
            relative = f"images/{split}/{index:05d}.png"
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(make_image(classes[true_label], image_size, rng, pixel_noise)).save(target)
            rows.append({"path": relative, "label": classes[label], "true_label": classes[true_label]})
        manifest = folder / f"{split}.csv"
        pd.DataFrame(rows).to_csv(manifest, index=False)
        manifests.append(manifest)
    return manifests[0], manifests[1]
