"""Open a checkpoint against a manifest: the model, its head, the class list and preprocessing.

This is the shared first step of `score`, `eval` and `refine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from irank._version import __version__
from irank.formats.manifest import Manifest, check_inside_root, encode_labels, read_manifest, resolve_classes
from irank.formats.tensor_rows import check_tensor_rows, shape_text
from irank.model.architectures import MLP
from irank.model.checkpoint import Checkpoint, build_model, find_head, load_weights, read_checkpoint, resolve_arch
from irank.model.inputs import BAD_IMAGE_POLICIES, Preprocess, find_bad_images, resolve_preprocess
from irank.options import ModelOptions
from irank.runtime.errors import CheckpointError, ImageError, UsageError


@dataclass
class Prepared:
    checkpoint: Checkpoint | None  # None for a model built fresh by `irank train`
    manifest: Manifest
    model: nn.Module
    head_name: str
    head: nn.Linear
    arch: str
    classes: list[str]
    class_source: str
    labels: np.ndarray
    preprocess: Preprocess
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what may make this run's results wrong, said once
    extra_metadata: dict = field(default_factory=dict)  # e.g. "probe" when refine cut the model at a layer
    skipped: list[dict] = field(default_factory=list)  # rows left out by --on-bad-image skip
    input_shape: tuple[int, ...] | None = None  # tensor rows: the shape of one row; None for images

    def metadata(self, **extra) -> dict:
        """irank metadata for a checkpoint derived from this one."""
        meta = {
            "format": 1,
            "irank_version": __version__,
            "arch": self.arch,
            "classes": self.classes,
            "head": self.head_name,
            "preprocess": self.preprocess.to_dict(),
        }
        if self.input_shape is not None:
            meta["input_shape"] = list(self.input_shape)
        meta.update(extra)
        return meta


IMAGE_FLAGS = (("preprocess", "--preprocess"), ("image_size", "--image-size"), ("resize", "--resize"),
               ("mean", "--mean"), ("std", "--std"))


def tensor_input_shape(manifest: Manifest, options: ModelOptions | None = None) -> tuple[int, ...] | None:
    """The shape of one row of a tensor manifest (every file checked); None for images.

    Image preprocessing flags are refused with tensor rows, which are fed to the model as stored.
    """
    if not manifest.holds_tensors:
        return None
    for attribute, flag in IMAGE_FLAGS:
        if options is not None and getattr(options, attribute) is not None:
            raise UsageError(f"{flag}: image preprocessing does not apply to the tensor rows of manifest "
                             f"{manifest.source}; they are fed to the model as stored")
    return check_tensor_rows(manifest.resolved_paths())


def check_input_fits(model: nn.Module, arch: str, manifest: Manifest, input_shape: tuple[int, ...] | None) -> None:
    """A built-in vector model (mlp-IN..., linear-IN) takes tensor rows of exactly IN values."""
    if not isinstance(model, MLP):
        return
    if input_shape is None:
        raise UsageError(f"architecture {arch} reads tensor rows (.npy/.safetensors files with an index column), "
                         f"but manifest {manifest.source} lists images")
    values = int(np.prod(input_shape))
    if values != model.in_features:
        held = f"{shape_text(input_shape)} = {values}" if len(input_shape) > 1 else str(values)
        raise CheckpointError(f"architecture {arch} takes rows of {model.in_features} values, but the rows of "
                              f"manifest {manifest.source} hold {held}")


def check_same_input(input_shape: tuple[int, ...] | None, manifest: Manifest, flag: str) -> None:
    """A second manifest (--val) must hold the same kind of rows, of the same shape, as the training one."""
    shape = tensor_input_shape(manifest)
    if shape != input_shape:
        def kind(value):
            return "images" if value is None else f"tensor rows of shape {shape_text(value)}"
        raise UsageError(f"{flag} {manifest.source}: holds {kind(shape)}, but the model is trained on {kind(input_shape)}")


def prepare(checkpoint_path: str | None, manifest_path: str, options: ModelOptions) -> Prepared:
    """Load `checkpoint_path` (or, when it is None, build a fresh `options.arch`) for `manifest_path`."""
    manifest = read_manifest(manifest_path)
    if not options.allow_outside_root:
        check_inside_root(manifest)
    if options.on_bad_image not in BAD_IMAGE_POLICIES:
        raise UsageError(f"--on-bad-image {options.on_bad_image}: choose from {', '.join(BAD_IMAGE_POLICIES)}")
    skipped = find_bad_images(manifest.resolved_paths(), num_workers=None) if options.on_bad_image == "skip" else []
    if skipped:
        bad_rows = {item["row"] - 1 for item in skipped}
        good = [row for row in range(len(manifest)) if row not in bad_rows]
        if not good:
            what = "tensor row" if manifest.holds_tensors else "image"
            raise ImageError(f"manifest {manifest_path}: no readable {what} in any row ({skipped[0]['reason']})")
        manifest = manifest.subset(good)
    input_shape = tensor_input_shape(manifest, options)
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path else None
    meta = checkpoint.metadata if checkpoint else {}
    classes, class_source = resolve_classes(
        manifest.labels, checkpoint_classes=meta.get("classes"), classes_file=options.classes
    )
    labels = encode_labels(manifest, classes)
    arch = resolve_arch(options.arch, checkpoint)
    model = build_model(arch, len(classes))
    check_input_fits(model, arch, manifest, input_shape)
    from irank.model.layers import with_probe

    model = with_probe(model, meta, len(classes))
    if checkpoint is not None:
        load_weights(model, checkpoint, arch)
    head_name, head = find_head(model, options.head or meta.get("head"))
    if head.out_features != len(classes):
        raise CheckpointError(
            f"the head {head_name} has {head.out_features} outputs but there are {len(classes)} classes "
            f"(from {class_source}); pass --classes or --head"
        )
    preprocess = resolve_preprocess(
        stored=meta.get("preprocess"),
        preset=options.preprocess,
        image_size=options.image_size,
        resize=options.resize,
        mean=options.mean,
        std=options.std,
    )
    notes = [f"{len(classes)} classes from {class_source}", f"head: {head_name} ({head.in_features} → {head.out_features})"]
    if skipped:
        what = "tensor rows" if manifest.holds_tensors else "images"
        notes.append(f"skipped {len(skipped)} unreadable {what} (first: row {skipped[0]['row']}, {skipped[0]['path']})")
    extra = {"probe": meta["probe"]} if meta.get("probe") else {}
    return Prepared(checkpoint, manifest, model, head_name, head, arch, classes, class_source, labels, preprocess, notes,
                    normalization_warnings(checkpoint, meta, options, input_shape), extra, skipped, input_shape)


def normalization_warnings(checkpoint: Checkpoint | None, meta: dict, options: ModelOptions,
                           input_shape: tuple[int, ...] | None) -> list[str]:
    """A checkpoint that records no preprocessing, given no normalization either, gets its images as raw 0..1
    pixels: right for a model trained so, wrong (silently: every score off) for one trained on normalized ones."""
    given = options.preprocess or options.mean or options.std
    if checkpoint is None or input_shape is not None or given or (meta.get("preprocess") or {}).get("mean"):
        return []
    return [f"checkpoint {checkpoint.path} records no preprocessing and none was given: images go in as raw 0..1 "
            "pixels; if the model was trained on normalized images, pass --preprocess imagenet (or cifar10), or "
            "--mean and --std"]


