"""Generated data sets with known label noise: for the demo, the tests, benchmarks and quick checks.

`make_dataset` draws images: each class is a shape (disk, square, ring, cross, stripes, ...) in a
random colour at a random place and size on a random background, with pixel noise. `make_embeddings`
writes tensor rows: Gaussian clusters, one per class, in one `.npy` file per split. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

EMBEDDING_CHUNK_ROWS = 1 << 16  # rows drawn at a time: a million rows never sit in memory as float64

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


def make_embeddings(
    folder: str | Path,
    *,
    num_rows: int = 1000,
    dim: int = 32,
    num_classes: int = 4,
    noise: float = 0.2,
    test_rows: int = 0,
    separation: float = 6.0,
    seed: int = 0,
) -> tuple[Path, Path | None]:
    """Write tensor rows with flipped labels: `train.npy` (float32, num_rows × dim) and `train.csv`
    (`path,label,index,true_label,flipped`), and with `test_rows` a clean `test.npy` and `test.csv`.

    Each class is a Gaussian cluster of unit spread around its own centre; centres lie about
    `separation` apart, so the classes are separable and a network that fits a flipped label has
    memorized it. Labels are `c0`, `c1`, ...; a `noise` share of training labels (exactly rounded) is
    moved to another class. Drawn in chunks and written with vectorized pandas, so a million rows take
    seconds and about the file's size in memory. Returns (train.csv, test.csv or None).
    """
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2")
    if num_rows < 1 or dim < 1 or test_rows < 0:
        raise ValueError("num_rows and dim must be positive and test_rows at least 0")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, separation / np.sqrt(2 * dim), (num_classes, dim)).astype(np.float32)
    names = np.array([f"c{k}" for k in range(num_classes)], dtype=object)
    manifests: list[Path | None] = []
    for split, size in (("train", num_rows), ("test", test_rows)):
        if size == 0:
            manifests.append(None)
            continue
        truth = np.arange(size) % num_classes
        rng.shuffle(truth)
        given = flip_labels(truth, num_classes, noise, rng) if split == "train" else truth
        values = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.float32, shape=(size, dim))
        for start in range(0, size, EMBEDDING_CHUNK_ROWS):
            stop = min(size, start + EMBEDDING_CHUNK_ROWS)
            chunk = rng.standard_normal((stop - start, dim), dtype=np.float32)
            chunk += centres[truth[start:stop]]
            values[start:stop] = chunk
        values.flush()
        del values
        table = pd.DataFrame({
            "path": pd.Categorical.from_codes(np.zeros(size, dtype=np.int8), [f"{split}.npy"]),
            "label": pd.Categorical.from_codes(given, names),
            "index": np.arange(size, dtype=np.int64),
            "true_label": pd.Categorical.from_codes(truth, names),
            "flipped": (given != truth).astype(np.int8),
        })
        manifest = folder / f"{split}.csv"
        table.to_csv(manifest, index=False)
        manifests.append(manifest)
    return manifests[0], manifests[1]
