"""`irank score`: checkpoint + manifest → per-sample influence and influential rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import influence
from ._version import __version__
from .boundary import HEAD_INPUT, BoundaryOptions, LayerChoice, block_candidates, choose_layer, refit_scores
from .data import make_shard_loader
from .distributed import Shard, all_or_none, local_rows, shard_of, writes_here
from .errors import UsageError
from .features import ForwardOutputs, forward_pass, resolve_device
from .layers import layer_features
from .files import check_outputs_clear_of_inputs, check_overwrite, is_stdio, sha256_file, write_json_atomic
from .loading import ModelOptions, Prepared, RunOptions, prepare
from .manifest import table_format, write_table
from .progress import Reporter
from .rank import scores_table

METHODS = ("influence", "loss", "margin", "gradnorm")


@dataclass
class ScoreResult:
    table: pd.DataFrame  # sorted by rank
    sidecar: dict  # provenance, as written next to the output


def method_scores(
    method: str,
    logits: torch.Tensor,
    head_inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    has_bias: bool = True,
    damping: float = 0.01,
    measure: str = "self-influence",
    curvature: str = "auto",
    shard: Shard | None = None,
) -> tuple[torch.Tensor, dict]:
    """Score every sample with `method` (higher = more likely mislabeled); also say how.

    With a `shard` (torchrun) the rows given are this process's, and influence uses every process's curvature.
    """
    if method == "influence":
        scores, used = influence.influence_scores(
            logits, head_inputs, labels, has_bias=has_bias, damping=damping, measure=measure, curvature=curvature,
            shard=shard,
        )
        return scores, {"influence_measure": measure, "curvature": used, "damping": damping}
    if method == "loss":
        return influence.cross_entropy(logits, labels), {}
    if method == "margin":
        return influence.negative_margin(logits, labels), {}
    if method == "gradnorm":
        return influence.gradient_norm(logits, head_inputs, labels, has_bias=has_bias), {}
    raise UsageError(f"--method {method}: choose from {', '.join(METHODS)}")


def validate_score_options(method: str, measure: str, curvature: str, damping: float) -> None:
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose from {', '.join(METHODS)}")
    if measure not in influence.MEASURES:
        raise UsageError(f"--influence-measure {measure}: choose from {', '.join(influence.MEASURES)}")
    if curvature not in influence.CURVATURES:
        raise UsageError(f"--curvature {curvature}: choose from {', '.join(influence.CURVATURES)}")
    if not damping > 0:
        raise UsageError(f"--damping {damping}: must be positive")


def shard_loader(prepared: Prepared, run: RunOptions, shard: Shard | None = None) -> tuple[object, int, int]:
    """(loader, rows it yields, manifest row of its first row): all rows, or this process's block under torchrun."""
    return make_shard_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                             num_workers=run.num_workers, shard=shard)


def run_forward(prepared: Prepared, run: RunOptions, reporter: Reporter, shard: Shard | None = None) -> ForwardOutputs:
    """Head inputs and logits of every row (of this process's block of rows, with a `shard`)."""
    loader, num_rows, first_row = shard_loader(prepared, run, shard)
    return forward_pass(
        prepared.model, prepared.head, loader, num_rows=num_rows,
        device=resolve_device(run.device), reporter=reporter, first_row=first_row,
    )


def probe_features(prepared: Prepared, boundary: BoundaryOptions, run: RunOptions, reporter: Reporter,
                   shard: Shard | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(the --layer asked for, with auto kept; features of each candidate layer) for a refit boundary."""
    layer = boundary.probe_layer
    if layer == "auto" and prepared.extra_metadata.get("probe"):
        layer = HEAD_INPUT  # the model is already cut at the layer a refit chose: refit on its probe's input
    names = block_candidates(prepared.model, prepared.head_name) if layer == "auto" else [layer]
    if layer == HEAD_INPUT:
        return layer, {HEAD_INPUT: run_forward(prepared, run, reporter, shard).head_inputs}
    loader, num_rows, first_row = shard_loader(prepared, run, shard)
    return layer, layer_features(prepared.model, names, loader, num_rows=num_rows, device=resolve_device(run.device),
                                 reporter=reporter, first_row=first_row)


def refit_on_features(layer: str, features: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int,
                      method: str, measure: str, boundary: BoundaryOptions, reporter: Reporter,
                      shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(scores, probe logits, details for the sidecar) from the candidate layers' features; `labels` and the
    features are this process's rows with a `shard`, and the probe is fitted on every process's rows."""
    if layer == "auto":
        choice = choose_layer(features, labels, num_classes, l2=boundary.l2, reporter=reporter, shard=shard)
        reporter.info(f"layer: {choice.layer} ({choice.how})")
    else:
        choice = LayerChoice(next(iter(features)), "given")
    scores, logits = refit_scores(features[choice.layer], labels, num_classes, method=method,
                                  measure=measure, l2=boundary.l2, shard=shard)
    details = {"boundary": "refit", "layer": choice.layer, "layer_choice": choice.how, "l2": boundary.l2,
               "influence_measure": measure if method == "influence" else None}
    if choice.figures:
        details["layers"] = choice.figures
    return scores, logits, details


def score(
    checkpoint: str,
    manifest: str,
    *,
    output: str | None = None,
    method: str = "influence",
    influence_measure: str = "self-influence",
    curvature: str = "auto",
    damping: float = 0.01,
    boundary: BoundaryOptions | None = None,
    model_options: ModelOptions | None = None,
    run_options: RunOptions | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
) -> ScoreResult:
    """Score and rank every sample of `manifest` under `checkpoint`; write the table to `output` if given.

    The table is sorted by rank (1 = most influential, the first to suspect of a wrong label) and
    `output` gets a JSON sidecar `output + '.json'` with the parameters and input hashes. An existing
    output or sidecar is replaced only with `overwrite`.
    """
    reporter = reporter or Reporter()
    model_options = model_options or ModelOptions()
    run_options = run_options or RunOptions()
    validate_score_options(method, influence_measure, curvature, damping)
    boundary = boundary or BoundaryOptions()
    with all_or_none():  # under torchrun: every process stops here if any check failed, before any work
        boundary.validate()
        if output is not None:
            table_format(output)
            sidecar_path = None if is_stdio(output) else output + ".json"
            check_outputs_clear_of_inputs(
                {"-o": output, "the sidecar": sidecar_path}, {"checkpoint": checkpoint, "manifest": manifest}
            )
            if writes_here():
                check_overwrite({"-o": output, "the sidecar": sidecar_path}, overwrite)
    with all_or_none():  # a bad image or non-finite output in any process's rows stops them all
        prepared = prepare(checkpoint, manifest, model_options)
        for note in prepared.notes:
            reporter.info(note)
        labels = torch.from_numpy(prepared.labels)
        shard = shard_of(len(labels))  # None with one process
        if boundary.kind == "head":
            outputs = run_forward(prepared, run_options, reporter, shard)
        else:
            layer, features = probe_features(prepared, boundary, run_options, reporter, shard)
    local_labels = local_rows(labels, shard)
    if boundary.kind == "head":
        logits = outputs.logits
        scores, details = method_scores(
            method, outputs.logits, outputs.head_inputs, local_labels,
            has_bias=prepared.head.bias is not None, damping=damping, measure=influence_measure, curvature=curvature,
            shard=shard,
        )
        details["boundary"] = "head"
    else:
        scores, logits, details = refit_on_features(layer, features, local_labels, len(prepared.classes), method,
                                                    influence_measure, boundary, reporter, shard)
    if shard is not None:  # every process gets every row's results, in manifest order
        scores, logits = shard.gather(scores), shard.gather(logits)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    table = scores_table(
        prepared.manifest.table,
        ids=prepared.manifest.ids,
        paths=prepared.manifest.paths,
        labels=prepared.labels,
        classes=prepared.classes,
        probs=probs,
        loss=influence.cross_entropy(logits, labels).numpy(),
        scores=scores.numpy(),
    )
    sidecar = {
        "irank_version": __version__,
        "command": "score",
        "method": method,
        "parameters": {
            **details,
            "arch": prepared.arch,
            "head": prepared.head_name,
            "preprocess": prepared.preprocess.to_dict(),
            "batch_size": run_options.batch_size,
        },
        "classes": prepared.classes,
        "class_source": prepared.class_source,
        "num_samples": len(table),
        "skipped_rows": prepared.skipped,
        "inputs": {
            "checkpoint": {"path": checkpoint, "sha256": sha256_file(checkpoint)},
            "manifest": {"path": manifest, "sha256": sha256_file(manifest)},
        },
    }
    with all_or_none():  # a failed write on rank 0 fails every process
        if output is not None and writes_here():
            write_table(table, output)
            if not is_stdio(output):
                write_json_atomic(output + ".json", sidecar)
    return ScoreResult(table=table, sidecar=sidecar)
