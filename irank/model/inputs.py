"""Datasets and transforms built from a manifest and a preprocessing spec.

Images are decoded and preprocessed here; tensor rows (`.npy`/`.safetensors` files with an `index`
column) are read by `irank.formats.tensor_rows` and fed as stored. `make_loader` picks the dataset from the paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from irank.formats.images import ImageRefused, decode_error, describe, max_image_pixels, open_image
from irank.formats.tensor_rows import TensorDataset, TensorRows, bad_tensor_rows, check_tensor_rows, is_tensor_path
from irank.options import AUGMENTS
from irank.runtime.errors import ImageError, UsageError

PRESETS = {
    "imagenet": {"resize": 256, "image_size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "cifar10": {"resize": None, "image_size": 32, "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "none": {"resize": None, "image_size": None, "mean": (0.0,), "std": (1.0,)},
}


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a tensor: optional resize (shorter side), centre crop, normalization."""

    image_size: int | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocess":
        return cls(
            image_size=values.get("image_size"),
            resize=values.get("resize"),
            mean=tuple(values.get("mean", (0.0,))),
            std=tuple(values.get("std", (1.0,))),
        )

    def transform(self, augment: str = "none"):
        """The torchvision transform for image rows (a `transforms.Compose`)."""
        # imported here: torchvision costs 165 MiB of memory, which runs on tensor rows never need
        from torchvision import transforms

        steps: list = []
        if self.resize:
            steps.append(transforms.Resize(self.resize))
        if self.image_size:
            if not self.resize:
                steps.append(transforms.Resize(self.image_size))
            steps.append(transforms.CenterCrop(self.image_size))
        if augment == "crop-flip":
            size = self.image_size
            if not size:
                raise UsageError("--augment crop-flip needs a known image size: pass --image-size")
            steps.append(transforms.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
        if augment in ("flip", "crop-flip"):
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)


def parse_channels(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected one number or comma-separated numbers per channel") from None
    if flag == "--std" and any(value <= 0 for value in values):
        raise UsageError(f"{flag} {text!r}: every value must be positive")
    return values


def resolve_preprocess(
    *,
    stored: dict | None = None,
    preset: str | None = None,
    image_size: int | None = None,
    resize: int | None = None,
    mean: str | None = None,
    std: str | None = None,
) -> Preprocess:
    """Flags override a preset, which overrides what the checkpoint stored, which overrides no-op defaults."""
    values = dict(PRESETS["none"])
    if stored:
        values.update({key: stored[key] for key in values if key in stored})
    if preset:
        if preset not in PRESETS:
            raise UsageError(f"--preprocess {preset}: unknown preset (choose from {', '.join(PRESETS)})")
        values.update(PRESETS[preset])
    for key, value in (("image_size", image_size), ("resize", resize)):
        if value is not None:
            if value <= 0:
                raise UsageError(f"--{key.replace('_', '-')} {value}: must be positive")
            values[key] = value
    parsed_mean, parsed_std = parse_channels(mean, "--mean"), parse_channels(std, "--std")
    if parsed_mean:
        values["mean"] = parsed_mean
    if parsed_std:
        values["std"] = parsed_std
    return Preprocess.from_dict(values)


class ImageDataset(Dataset):
    """Images of a manifest; each item is (tensor or None, row, error message or None)."""

    def __init__(self, paths: Sequence[Path], transform, rows: Sequence[int] | None = None):
        self.max_pixels = max_image_pixels()
        self.paths = paths
        self.transform = transform
        self.rows = rows if rows is not None else range(len(paths))  # a range: no list of a million ints

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int):
        row = self.rows[item]
        path = self.paths[row]
        try:
            with open_image(path, self.max_pixels) as image:
                tensor = self.transform(image.convert("RGB"))
        except ImageRefused as exc:
            return None, row, describe(path, row, exc.reason)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return None, row, describe(path, row, decode_error(exc))
        return tensor, row, None


BAD_IMAGE_POLICIES = ("fail", "skip")
AUTO_WORKERS_CAP = 8


def auto_workers() -> int:
    """Loader workers for `--num-workers auto` on images: this process's share of the usable CPUs (torchrun's
    processes on a node split them), at most AUTO_WORKERS_CAP; none when the share is a single CPU, where a
    worker would only take turns with the main process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return min(AUTO_WORKERS_CAP, share) if share >= 2 else 0


def resolve_workers(num_workers: int | None, paths) -> int:
    """`num_workers` as given, or for None (auto) `auto_workers()` on images and 0 on tensor rows, which are
    read from their files faster than a worker process can hand them over."""
    if num_workers is None:
        return 0 if isinstance(paths, TensorRows) else auto_workers()
    if num_workers < 0:
        raise UsageError(f"--num-workers {num_workers}: must be 0 or more")
    return num_workers


def find_bad_images(paths: Sequence[Path] | TensorRows, *, num_workers: int | None = 0) -> list[dict]:
    """Decode every image once (no transform); rows that fail, as {row (1-based), path, reason}.

    For tensor rows, every file's header is read once and every index checked against its length.
    """
    if isinstance(paths, TensorRows):
        return bad_tensor_rows(paths)
    dataset = ImageDataset(paths, transform=lambda image: torch.zeros(0))
    loader = DataLoader(dataset, batch_size=64, num_workers=resolve_workers(num_workers, paths), collate_fn=lambda items: items)
    bad = []
    for items in loader:
        for _, row, error in items:
            if error:
                bad.append({"row": row + 1, "path": str(paths[row]), "reason": error})
    return bad


def collate_images(items):
    """Stack a batch; a bad image or a size mismatch comes back as a message, raised by `batches`.

    (Raising inside a DataLoader worker would wrap the message in a traceback.)
    """
    rows = torch.tensor([row for _, row, _ in items], dtype=torch.long)
    for _, _, error in items:
        if error:
            return None, rows, error
    tensors = [tensor for tensor, _, _ in items]
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        first, second = shapes[:2]
        if len(first) != 3 or len(second) != 3:
            return None, rows, f"rows differ in shape ({first} and {second} in one batch)"
        return None, rows, (
            f"images differ in size ({first[1]}x{first[2]} and {second[1]}x{second[2]} in one batch); "
            "pass --image-size (and --resize) to bring them to one size"
        )
    return torch.stack(tensors), rows, None


def batches(loader):
    """Yield (images, rows) from a loader built by `make_loader`, raising ImageError for bad input."""
    for images, rows, error in loader:
        if error:
            raise ImageError(error)
        yield images, rows


class ShardLoader:
    """A loader over the contiguous rows [first_row, first_row + n) of a manifest, yielding rows counted
    from `first_row`, so that per-row outputs fill arrays of this shard's size (one process's share under
    torchrun). Messages about bad images still name the manifest's own row."""

    def __init__(self, loader: DataLoader, first_row: int):
        self.loader = loader
        self.first_row = first_row

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, rows, error in self.loader:
            yield images, rows - self.first_row, error


def resolve_augment(augment: str, paths: "Sequence[Path] | TensorRows", preprocess: Preprocess) -> str:
    """`auto`: random crops and flips on images of a known size, flips on other images, none on tensor rows."""
    if augment != "auto":
        return augment
    if isinstance(paths, TensorRows):
        return "none"
    return "crop-flip" if preprocess.image_size else "flip"


def make_loader(
    paths: Sequence[Path] | TensorRows,
    preprocess: Preprocess,
    *,
    batch_size: int,
    num_workers: int | None = 0,
    augment: str = "none",
    rows: list[int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    if batch_size <= 0:
        raise UsageError(f"--batch-size {batch_size}: must be positive")
    num_workers = resolve_workers(num_workers, paths)
    if augment not in AUGMENTS:
        raise UsageError(f"--augment {augment}: choose from {', '.join(AUGMENTS)}")
    augment = resolve_augment(augment, paths, preprocess)
    if isinstance(paths, TensorRows):
        if augment != "none":
            raise UsageError(f"--augment {augment}: augmentation is for images; tensor rows are read as stored")
        dataset = TensorDataset(paths, check_tensor_rows(paths), rows)
    elif paths and is_tensor_path(paths[0]):
        raise UsageError(f"{paths[0]}: a tensor file needs its row: build the paths with Manifest.resolved_paths()")
    else:
        dataset = ImageDataset(paths, preprocess.transform(augment), rows)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_images,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: the copy to the GPU overlaps the next batch
    )


def make_shard_loader(paths: Sequence[Path] | TensorRows, preprocess: Preprocess, *, batch_size: int, num_workers: int | None = 0,
                      shard=None) -> tuple[DataLoader | ShardLoader, int, int]:
    """(loader, how many rows it yields, the manifest row of its first row): every row, or with a
    `distributed.Shard` this process's block of rows, counted from the block's start."""
    if shard is None:
        return make_loader(paths, preprocess, batch_size=batch_size, num_workers=num_workers), len(paths), 0
    loader = make_loader(paths, preprocess, batch_size=batch_size, num_workers=num_workers,
                         rows=range(shard.start, shard.stop))
    return ShardLoader(loader, shard.start), shard.local, shard.start


class ShardedShuffle(Sampler):
    """Training order for one of `parts` processes (DistributedSampler's rule): every epoch a fresh
    permutation of all rows, the same on every process (one generator seeded alike), padded with its own
    first rows to a multiple of `parts`, of which process `index` takes every `parts`-th row. Every process
    thus gets as many rows, and as many batches, as the others."""

    def __init__(self, total: int, *, seed: int, index: int, parts: int):
        self.total, self.index, self.parts = total, index, parts
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.total // self.parts)

    def __iter__(self):
        order = torch.randperm(self.total, generator=self.generator).tolist()
        order += order[: (-len(order)) % self.parts]
        return iter(order[self.index :: self.parts])
