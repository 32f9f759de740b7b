"""`irank score`: checkpoint + manifest → per-sample influence and influential rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import influence
from ._version import __version__
from .boundary import (HEAD_INPUT, BoundaryOptions, LayerChoice, block_candidates, choice_sample, choose_layer,
                       refit_scores)
from .data import make_loader
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
) -> tuple[torch.Tensor, dict]:
    """Score every sample with `method` (higher = more likely mislabeled); also say how."""
    if method == "influence":
        scores, used = influence.influence_scores(
            logits, head_inputs, labels, has_bias=has_bias, damping=damping, measure=measure, curvature=curvature
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


def run_forward(prepared: Prepared, run: RunOptions, reporter: Reporter) -> ForwardOutputs:
    loader = make_loader(
        prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size, num_workers=run.num_workers
    )
    return forward_pass(
        prepared.model, prepared.head, loader, num_rows=len(prepared.manifest),
        device=resolve_device(run.device), reporter=reporter,
    )


def refit_boundary(prepared: Prepared, labels: torch.Tensor, method: str, measure: str, boundary: BoundaryOptions,
                   run: RunOptions, reporter: Reporter) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Scores on an L2 probe refit at the chosen layer: (scores, probe logits, details for the sidecar)."""
    layer = boundary.probe_layer
    if layer == "auto" and prepared.extra_metadata.get("probe"):
        layer = HEAD_INPUT  # the model is already cut at the layer a refit chose: refit on its probe's input
    if layer == "auto" and not block_candidates(prepared.model, prepared.head_name):
        layer = HEAD_INPUT  # a model with nothing before its head (a plain linear classifier): probe the head's input
    if layer == "auto":
        features, choice = auto_layer_features(prepared, labels, boundary.l2, run, reporter)
    elif layer == HEAD_INPUT:
        features, choice = run_forward(prepared, run, reporter).head_inputs, LayerChoice(HEAD_INPUT, "given")
    else:
        features = layer_features(prepared.model, layer, layer_loader(prepared, run), num_rows=len(labels),
                                  device=resolve_device(run.device), reporter=reporter)
        choice = LayerChoice(layer, "given")
    scores, logits = refit_scores(features, labels, len(prepared.classes), method=method, measure=measure,
                                  l2=boundary.l2)
    details = {"boundary": "refit", "layer": choice.layer, "layer_choice": choice.how, "l2": boundary.l2,
               "influence_measure": measure if method == "influence" else None}
    if choice.figures:
        details["layers"] = choice.figures
    return scores, logits, details


def layer_loader(prepared: Prepared, run: RunOptions, rows: list[int] | None = None):
    return make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                       num_workers=run.num_workers, rows=rows)


def auto_layer_features(prepared: Prepared, labels: torch.Tensor, l2: float, run: RunOptions,
                        reporter: Reporter) -> tuple[torch.Tensor, LayerChoice]:
    """Features of every row at the layer `--layer auto` picks, for less than one forward pass.

    The candidates are read, in one pass, on the seeded random sample of rows the choice uses; the
    layer is chosen; the other rows then run only up to the chosen layer.
    """
    num_rows = len(labels)
    device = resolve_device(run.device)
    names = block_candidates(prepared.model, prepared.head_name)
    sample = choice_sample(num_rows)
    first = list(range(num_rows)) if sample is None else sample.tolist()
    candidates = layer_features(prepared.model, names, layer_loader(prepared, run, first), num_rows=num_rows,
                                device=device, reporter=reporter, row_order=None if sample is None else first)
    choice = choose_layer(candidates, labels[sample] if sample is not None else labels, len(prepared.classes),
                          l2=l2, reporter=reporter, max_rows=len(first))
    if sample is not None:
        choice.how += f" (on a random sample of {len(first):,} rows)"
    reporter.info(f"layer: {choice.layer} ({choice.how})")
    if sample is None:
        return candidates[choice.layer], choice
    chosen = candidates.pop(choice.layer)
    del candidates
    in_sample = set(first)
    rest = [row for row in range(num_rows) if row not in in_sample]
    features = torch.empty(num_rows, chosen.shape[1], dtype=torch.float32)
    features[sample] = chosen
    features[rest] = layer_features(prepared.model, choice.layer, layer_loader(prepared, run, rest), num_rows=num_rows,
                                    device=device, reporter=reporter, row_order=rest)
    return features, choice


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
    boundary.validate()
    if output is not None:
        table_format(output)
        sidecar_path = None if is_stdio(output) else output + ".json"
        check_outputs_clear_of_inputs(
            {"-o": output, "the sidecar": sidecar_path}, {"checkpoint": checkpoint, "manifest": manifest}
        )
        check_overwrite({"-o": output, "the sidecar": sidecar_path}, overwrite)
    prepared = prepare(checkpoint, manifest, model_options)
    for note in prepared.notes:
        reporter.info(note)
    labels = torch.from_numpy(prepared.labels)
    if boundary.kind == "head":
        outputs = run_forward(prepared, run_options, reporter)
        logits = outputs.logits
        scores, details = method_scores(
            method, outputs.logits, outputs.head_inputs, labels,
            has_bias=prepared.head.bias is not None, damping=damping, measure=influence_measure, curvature=curvature,
        )
        details["boundary"] = "head"
    else:
        scores, logits, details = refit_boundary(prepared, labels, method, influence_measure, boundary, run_options, reporter)
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
    if output is not None:
        write_table(table, output)
        if not is_stdio(output):
            write_json_atomic(output + ".json", sidecar)
    return ScoreResult(table=table, sidecar=sidecar)
