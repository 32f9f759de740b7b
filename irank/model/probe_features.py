"""The features a refit probe is fitted on: one layer's (or the head's input), or the layer `--layer auto` chooses.

--layer auto reads every candidate layer on a seeded random sample of rows, chooses there (irank.core.layer_choice),
then runs the other rows only up to the chosen layer: less than one forward pass (one, when the head's logits are
read too: the joint loss ranks by the probe's loss and the head's). Under torchrun the sample's
features are gathered between the two reads, so the choice is made on the same rows as by one process.
Row lists are numpy arrays here: at a million rows, Python lists of ints cost tens of MiB each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from irank.core.layer_choice import LayerChoice, choice_sample, choose_layer, choose_layer_by_accuracy
from irank.formats.manifest import check_inside_root, encode_labels, read_manifest
from irank.model.forward import run_forward, shard_loader
from irank.model.inputs import make_loader
from irank.model.layers import block_candidates, layer_features
from irank.model.placement import placement_for
from irank.model.prepare import Prepared, check_same_input
from irank.options import HEAD_INPUT, BoundaryOptions, ModelOptions, RunOptions
from irank.runtime.distributed import Shard, all_or_none, broadcast_object, gather_objects
from irank.runtime.memory import DiskRows, MemoryBudget
from irank.runtime.progress import Reporter

HEAD_LOGITS = "(the head's logits)"  # beside the candidate layers' features of the choice sample


@dataclass
class ProbeInputs:
    """What a refit probe is fitted on, for the rows this process holds."""

    features: torch.Tensor | DiskRows  # at the probe's layer
    choice: LayerChoice  # how that layer was chosen
    head_logits: torch.Tensor | None = None  # the checkpoint's own head's outputs, when asked for


def probe_features(prepared: Prepared, boundary: BoundaryOptions, model_options: ModelOptions, run: RunOptions,
                   reporter: Reporter, shard: Shard | None, budget: MemoryBudget, *,
                   with_head: bool = False) -> ProbeInputs:
    """The features of every row this process holds at the probe's layer, how that layer was chosen, and with
    `with_head` the head's logits of the same rows, read in the same pass."""
    layer = refit_layer(prepared, boundary)
    if boundary.val and layer != "auto":
        reporter.info(f"--val: no layer to choose ({prepared.arch} is probed at {layer}); not used")
    if layer != "auto":
        with all_or_none():
            features, logits = read_layer(prepared, layer, run, reporter, shard, budget, with_head=with_head)
        return ProbeInputs(features, LayerChoice(layer, "given"), logits)
    with all_or_none():
        held_out = read_val(prepared, boundary.val, model_options, run, reporter) if boundary.val else None
        sample_rows, candidates = read_choice_sample(prepared, boundary.choice_rows, run, reporter, shard)
    # the gather lies between two agreement blocks: no collective inside one
    labels = torch.from_numpy(prepared.labels)
    choice = choose_on_sample(sample_rows, candidates, labels, len(prepared.classes), boundary.l2, reporter, shard,
                              held_out)
    del held_out
    with all_or_none():
        features, logits = read_rest(prepared, choice.layer, sample_rows, candidates, run, reporter, shard, budget,
                                     with_head=with_head)
    return ProbeInputs(features, choice, logits)


def refit_layer(prepared: Prepared, boundary: BoundaryOptions) -> str:
    """The layer a refit boundary reads: a module name, HEAD_INPUT, or "auto"."""
    layer = boundary.probe_layer
    if layer == "auto" and prepared.extra_metadata.get("probe"):
        return HEAD_INPUT  # the model is already cut at the layer a refit chose: refit on its probe's input
    if layer == "auto" and not block_candidates(prepared.model, prepared.head_name):
        return HEAD_INPUT  # a model with nothing before its head (a plain linear classifier): probe the head's input
    return layer


def read_layer(prepared: Prepared, layer: str, run: RunOptions, reporter: Reporter, shard: Shard | None = None,
               budget: MemoryBudget | None = None, *,
               with_head: bool = False) -> tuple[torch.Tensor | DiskRows, torch.Tensor | None]:
    """(features at a named layer or the head's input, with `with_head` the head's logits; else None) of every row,
    or of this process's block of rows."""
    if layer == HEAD_INPUT:
        outputs = run_forward(prepared, run, reporter, shard, budget)
        return outputs.head_inputs, outputs.logits if with_head else None
    loader, num_rows, first_row = shard_loader(prepared, run, shard)
    names = [layer, prepared.head_name] if with_head else [layer]
    read = layer_features(prepared.model, names, loader, num_rows=num_rows, device=placement_for(run, prepared.model),
                          reporter=reporter, first_row=first_row, budget=budget)
    return read[layer], read.get(prepared.head_name)


def block_rows(num_rows: int, shard: Shard | None) -> range:
    return range(num_rows) if shard is None else range(shard.start, shard.stop)


def rows_loader(prepared: Prepared, run: RunOptions, rows: np.ndarray):
    """A loader over the given manifest rows, in their order."""
    return make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                       num_workers=run.num_workers, rows=rows)


def read_choice_sample(prepared: Prepared, sample_size: int, run: RunOptions, reporter: Reporter,
                       shard: Shard | None = None) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """(the sample's rows, sorted; the candidate layers' features of the sample rows this process holds)."""
    num_rows = len(prepared.labels)
    sample = choice_sample(num_rows, limit=sample_size)
    sample_rows = np.arange(num_rows) if sample is None else sample.numpy()
    block = block_rows(num_rows, shard)
    mine = sample_rows[(sample_rows >= block.start) & (sample_rows < block.stop)]
    names = block_candidates(prepared.model, prepared.head_name)
    if len(mine) == 0:
        return sample_rows, {}
    # the head's output too, in the same pass: how well the checkpoint fits its labels (a run-saving warning)
    candidates = layer_features(prepared.model, names + [prepared.head_name], rows_loader(prepared, run, mine),
                                num_rows=len(mine), device=placement_for(run, prepared.model), reporter=reporter,
                                row_order=mine)
    candidates[HEAD_LOGITS] = candidates.pop(prepared.head_name)
    return sample_rows, candidates


def read_val(prepared: Prepared, val: str, model_options: ModelOptions, run: RunOptions,
             reporter: Reporter) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The candidate layers' features and the labels (in the manifest's class list) of every --val row; every
    process reads all of them (a small clean set)."""
    manifest = read_manifest(val)
    if not model_options.allow_outside_root:
        check_inside_root(manifest)
    check_same_input(prepared.input_shape, manifest, "--val")
    labels = torch.from_numpy(encode_labels(manifest, prepared.classes))
    loader = make_loader(manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                         num_workers=run.num_workers)
    names = block_candidates(prepared.model, prepared.head_name)
    features = layer_features(prepared.model, names, loader, num_rows=len(manifest), device=placement_for(run, prepared.model),
                              reporter=reporter)
    return features, labels


def choose_on_sample(sample_rows: np.ndarray, candidates: dict[str, torch.Tensor], labels: torch.Tensor,
                     num_classes: int, l2: float, reporter: Reporter, shard: Shard | None = None,
                     held_out: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None) -> LayerChoice:
    """The layer, chosen on the sample's rows (gathered from every process under torchrun): by the held-out
    loss on the given labels, or, with `held_out` (--val's features and labels), by accuracy there."""
    if shard is not None:  # blocks are contiguous and the sample is sorted: rank order is row order
        parts = [part for part in gather_objects(candidates) if part]
        candidates = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    sample_labels = labels[torch.from_numpy(sample_rows)]
    head_logits = candidates[HEAD_LOGITS]
    candidates = {name: features for name, features in candidates.items() if name != HEAD_LOGITS}
    if held_out is not None:
        choice = choose_layer_by_accuracy(candidates, sample_labels, *held_out, num_classes, l2=l2, log=reporter.info)
    else:
        choice = choose_layer(candidates, sample_labels, num_classes, l2=l2, log=reporter.info,
                              max_rows=len(sample_rows))
    choice.head_label_fit = float((head_logits.argmax(1) == sample_labels).double().mean())
    if len(sample_rows) < len(labels):
        choice.how += f" (on a random sample of {len(sample_rows):,} rows)"
    if shard is not None:
        choice = broadcast_object(choice)  # one decision, whatever the processes' arithmetic
    reporter.info(f"layer: {choice.layer} ({choice.how})")
    return choice


def read_rest(prepared: Prepared, layer: str, sample_rows: np.ndarray, candidates: dict[str, torch.Tensor],
              run: RunOptions, reporter: Reporter, shard: Shard | None = None, budget: MemoryBudget | None = None, *,
              with_head: bool = False) -> tuple[torch.Tensor | DiskRows, torch.Tensor | None]:
    """(features at the chosen layer, with `with_head` the head's logits; else None) of every row this process
    holds: the sample's already read, the others read now, each forward pass stopping at the layer (or, with the
    head, running through)."""
    block = block_rows(len(prepared.labels), shard)
    mine = sample_rows[(sample_rows >= block.start) & (sample_rows < block.stop)]
    outside = np.ones(len(block), dtype=bool)  # a byte a row, where setdiff1d's temporaries took ~25
    outside[mine - block.start] = False
    rest = np.flatnonzero(outside)
    rest += block.start
    del outside
    wanted = {layer: layer, **({HEAD_LOGITS: prepared.head_name} if with_head else {})}  # key → module
    if len(rest) == 0:
        return candidates[layer], candidates.get(HEAD_LOGITS) if with_head else None
    if len(mine):
        widths = {key: candidates[key].shape[1] for key in wanted}
    else:  # this process holds none of the sample (a tiny shard): learn the widths from its first row
        first = layer_features(prepared.model, list(wanted.values()), rows_loader(prepared, run, rest[:1]), num_rows=1,
                               device=placement_for(run, prepared.model), row_order=rest[:1])
        widths = {key: first[module].shape[1] for key, module in wanted.items()}
    out = {module: (budget or MemoryBudget()).array(len(block), widths[key]) for key, module in wanted.items()}
    if len(mine):
        for key, module in wanted.items():
            out[module].index_copy_(0, torch.from_numpy(mine - block.start), candidates[key])
    # written in place, row i of this process's block at i: no second copy of the rows' features
    read = layer_features(prepared.model, list(wanted.values()), rows_loader(prepared, run, rest), num_rows=len(block),
                          device=placement_for(run, prepared.model), reporter=reporter, row_order=block, out=out)
    return read[layer], read.get(prepared.head_name) if with_head else None
