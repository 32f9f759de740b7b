"""`irank score`: checkpoint + manifest → per-sample influence and influential rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import influence
from ._version import __version__
from .boundary import (HEAD_INPUT, BoundaryOptions, LayerChoice, block_candidates, choice_sample, choose_layer,
                       choose_layer_by_accuracy, refit_scores)
from .columns import compact_codes
from .data import make_loader, make_shard_loader
from .distributed import Shard, all_or_none, broadcast_object, gather_objects, local_rows, shard_of, writes_here
from .errors import UsageError
from .probe import PROBE_MEASURES, probe_curvature
from .features import ForwardOutputs, forward_pass
from .layers import layer_features
from .files import check_outputs_clear_of_inputs, check_overwrite, is_stdio, output_set, sha256_file, write_json_atomic
from .loading import ModelOptions, Prepared, RunOptions, check_same_input, prepare
from .manifest import check_inside_root, encode_labels, read_manifest, table_format, write_blocks
from .method_choice import resolve_method
from .placement import Placement
from .progress import Reporter
from .rank import RankedScores, prediction_rows
from .rowstore import DiskRows, MemoryBudget

METHODS = ("auto", "influence", "loss", "margin", "gradnorm")


@dataclass
class ScoreResult:
    ranked: RankedScores  # the scores table, built a block of rows at a time
    sidecar: dict  # provenance, as written next to the output

    @property
    def table(self) -> pd.DataFrame:
        """The whole scores table, sorted by rank (built on first use: at millions of rows, a GB of strings)."""
        return self.ranked.frame()


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
    raise UsageError(f"--method {method}: choose from {', '.join(METHODS[1:])} (resolve auto first)")


DEFAULT_MEASURE = "self-influence"
DEFAULT_CURVATURE = "auto"
DEFAULT_DAMPING = 0.01


def validate_score_options(method: str, measure: str | None, curvature: str | None, damping: float | None) -> None:
    """The values are among the choices (None: not given)."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose from {', '.join(METHODS)}")
    if measure is not None and measure not in influence.MEASURES:
        raise UsageError(f"--influence-measure {measure}: choose from {', '.join(influence.MEASURES)}")
    if curvature is not None and curvature not in influence.CURVATURES:
        raise UsageError(f"--curvature {curvature}: choose from {', '.join(influence.CURVATURES)}")
    if damping is not None and not damping > 0:
        raise UsageError(f"--damping {damping}: must be positive")


@dataclass(frozen=True)
class Ranking:
    """What a score ranks by, resolved from what was asked: the method (auto resolved), why, and the
    influence settings that act on it (None where they do not: the method is not influence, or a refit
    probe's curvature is its own)."""

    method: str
    how: str
    measure: str | None
    curvature: str | None
    damping: float | None


def _chosen_method(method: str, boundary: str, measure: str | None) -> tuple[str, str]:
    if method == "auto" and measure is not None and boundary == "refit":
        return "influence", (f"--influence-measure {measure} given: ranking by influence (--method auto alone ranks "
                             "by the probe's loss here)")
    return resolve_method(method, boundary)


def acting_flags(method: str, boundary: str, *, measure: str | None = None, curvature: str | None = None,
                 damping: float | None = None) -> dict:
    """Of the influence settings given (not None), those that act on a ranking by `method` on `boundary`, as
    `score`'s keywords: what a caller that ranks on several boundaries (post-train's rounds) passes to each."""
    chosen, _ = _chosen_method(method, boundary, measure)
    if chosen != "influence":
        return {}
    given = {"influence_measure": measure}
    if boundary == "head":
        given |= {"curvature": curvature, "damping": damping}
    return {key: value for key, value in given.items() if value is not None}


def resolve_ranking(method: str, boundary: str, *, measure: str | None = None, curvature: str | None = None,
                    damping: float | None = None) -> Ranking:
    """The ranking `score` runs for `method` on `boundary` ("head" or "refit"), with the influence flags given
    (None: not given). `--method auto` with a measure given asks for influence, on a refit probe too (where auto
    alone ranks by the probe's loss). A flag that would do nothing is refused: the measure, curvature and
    damping act on influence only, and curvature and damping on the head only (a probe's influence inverts
    its own curvature: its Gauss–Newton matrix plus its L2 term, `--l2`)."""
    validate_score_options(method, measure, curvature, damping)
    chosen, how = _chosen_method(method, boundary, measure)
    given = {"--influence-measure": measure, "--curvature": curvature, "--damping": damping}
    for flag, value in given.items():
        if value is not None and flag != "--influence-measure" and boundary == "refit":
            raise UsageError(f"{flag} applies to --boundary head; a refit probe's influence uses the probe's own "
                             "curvature (its Gauss-Newton matrix plus its L2 term, --l2)")
        if value is not None and chosen != "influence":
            raise UsageError(f"{flag} applies to influence; this ranks by the {chosen} ({how})")
    if chosen != "influence":
        return Ranking(chosen, how, None, None, None)
    measure = measure or DEFAULT_MEASURE
    if boundary == "refit":
        if measure not in PROBE_MEASURES:
            raise UsageError(f"--influence-measure {measure}: not on a refit probe (use self-influence or "
                             "boundary-shift, or --boundary head)")
        return Ranking(chosen, how, measure, None, None)
    return Ranking(chosen, how, measure, curvature or DEFAULT_CURVATURE, DEFAULT_DAMPING if damping is None else damping)


def shard_loader(prepared: Prepared, run: RunOptions, shard: Shard | None = None) -> tuple[object, int, int]:
    """(loader, rows it yields, manifest row of its first row): all rows, or this process's block under torchrun."""
    return make_shard_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                             num_workers=run.num_workers, shard=shard)


def run_forward(prepared: Prepared, run: RunOptions, reporter: Reporter, shard: Shard | None = None,
                budget: MemoryBudget | None = None) -> ForwardOutputs:
    """Head inputs and logits of every row (of this process's block of rows, with a `shard`); with a
    `budget`, past it they go to temporary files."""
    loader, num_rows, first_row = shard_loader(prepared, run, shard)
    return forward_pass(
        prepared.model, prepared.head, loader, num_rows=num_rows,
        device=run.placement(prepared.model), reporter=reporter, first_row=first_row, budget=budget,
    )


def refit_layer(prepared: Prepared, boundary: BoundaryOptions) -> str:
    """The layer a refit boundary reads: a module name, HEAD_INPUT, or "auto"."""
    layer = boundary.probe_layer
    if layer == "auto" and prepared.extra_metadata.get("probe"):
        return HEAD_INPUT  # the model is already cut at the layer a refit chose: refit on its probe's input
    if layer == "auto" and not block_candidates(prepared.model, prepared.head_name):
        return HEAD_INPUT  # a model with nothing before its head (a plain linear classifier): probe the head's input
    return layer


def read_layer(prepared: Prepared, layer: str, run: RunOptions, reporter: Reporter,
               shard: Shard | None = None, budget: MemoryBudget | None = None) -> torch.Tensor | DiskRows:
    """Features at a named layer (or the head's input) of every row, or of this process's block of rows."""
    if layer == HEAD_INPUT:
        return run_forward(prepared, run, reporter, shard, budget).head_inputs
    loader, num_rows, first_row = shard_loader(prepared, run, shard)
    return layer_features(prepared.model, layer, loader, num_rows=num_rows, device=run.placement(prepared.model),
                          reporter=reporter, first_row=first_row, budget=budget)


# --layer auto reads every candidate layer on a seeded random sample of rows, chooses there, then runs the
# other rows only up to the chosen layer: less than one forward pass. Under torchrun the sample's features are
# gathered between the two reads, so the choice is made on the same rows as by one process.


def block_rows(num_rows: int, shard: Shard | None) -> range:
    return range(num_rows) if shard is None else range(shard.start, shard.stop)


# Row lists are numpy arrays here: at a million rows, Python lists of ints cost tens of MiB each.


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
    candidates = layer_features(prepared.model, names, rows_loader(prepared, run, mine), num_rows=len(mine), device=run.placement(prepared.model),
                                reporter=reporter, row_order=mine)
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
    features = layer_features(prepared.model, names, loader, num_rows=len(manifest), device=run.placement(prepared.model),
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
    if held_out is not None:
        choice = choose_layer_by_accuracy(candidates, sample_labels, *held_out, num_classes, l2=l2, reporter=reporter)
    else:
        choice = choose_layer(candidates, sample_labels, num_classes, l2=l2, reporter=reporter,
                              max_rows=len(sample_rows))
    if len(sample_rows) < len(labels):
        choice.how += f" (on a random sample of {len(sample_rows):,} rows)"
    if shard is not None:
        choice = broadcast_object(choice)  # one decision, whatever the processes' arithmetic
    reporter.info(f"layer: {choice.layer} ({choice.how})")
    return choice


def read_rest(prepared: Prepared, layer: str, sample_rows: np.ndarray, candidates: dict[str, torch.Tensor],
              run: RunOptions, reporter: Reporter, shard: Shard | None = None,
              budget: MemoryBudget | None = None) -> torch.Tensor | DiskRows:
    """Features at the chosen layer of every row this process holds: the sample's already read, the others
    read now, each forward pass stopping at the layer."""
    block = block_rows(len(prepared.labels), shard)
    mine = sample_rows[(sample_rows >= block.start) & (sample_rows < block.stop)]
    outside = np.ones(len(block), dtype=bool)  # a byte a row, where setdiff1d's temporaries took ~25
    outside[mine - block.start] = False
    rest = np.flatnonzero(outside)
    rest += block.start
    del outside
    if len(rest) == 0:
        return candidates[layer]
    if len(mine):
        width = candidates[layer].shape[1]
    else:  # this process holds none of the sample (a tiny shard): learn the width from its first row
        width = layer_features(prepared.model, layer, rows_loader(prepared, run, rest[:1]), num_rows=1,
                               device=run.placement(prepared.model), row_order=rest[:1]).shape[1]
    features = (budget or MemoryBudget()).array(len(block), width)
    if len(mine):
        features.index_copy_(0, torch.from_numpy(mine - block.start), candidates[layer])
    # written in place, row i of this process's block at i: no second copy of the rows' features
    return layer_features(prepared.model, layer, rows_loader(prepared, run, rest), num_rows=len(block), device=run.placement(prepared.model),
                          reporter=reporter, row_order=block, out=features)


def counted(blocks, advance):
    """The blocks, advancing a progress bar by each one's rows once it has been handed on (written)."""
    for block in blocks:
        yield block
        advance(len(block))


def placement_details(place: Placement) -> dict:
    """What the sidecar says of how the model ran: it moves the scores by float rounding (precision more)."""
    return {"device": place.device.type, "channels_last": place.channels_last, "precision": place.precision}


def method_details(requested: str, how: str) -> dict:
    """What the sidecar says of `--method auto`: nothing when the method was given."""
    return {"method_choice": {"requested": "auto", "how": how}} if requested == "auto" else {}


def refit_details(choice: LayerChoice, boundary: BoundaryOptions, ranking: Ranking, rows: int, num_classes: int,
                  dims: int) -> dict:
    """What the sidecar says of a refit boundary: the layer, how it was chosen, the L2, and with influence its
    measure and how the probe's curvature was inverted (exact or kfac; its damping is the L2)."""
    details = {"boundary": "refit", "layer": choice.layer, "layer_choice": choice.how, "l2": boundary.l2,
               "influence_measure": ranking.measure}
    if ranking.method == "influence":
        details["curvature"] = probe_curvature(rows, num_classes, dims + 1)
    if choice.figures:
        details["layers"] = choice.figures
    return details


def score(
    checkpoint: str,
    manifest: str,
    *,
    output: str | None = None,
    method: str = "auto",
    influence_measure: str | None = None,
    curvature: str | None = None,
    damping: float | None = None,
    boundary: BoundaryOptions | None = None,
    model_options: ModelOptions | None = None,
    run_options: RunOptions | None = None,
    reporter: Reporter | None = None,
    overwrite: bool = False,
) -> ScoreResult:
    """Score and rank every sample of `manifest` under `checkpoint`; write the table to `output` if given.

    `method` auto: influence on the head, the probe's loss on a refit probe (see `method_choice`).
    `influence_measure` (default self-influence), `curvature` (auto) and `damping` (0.01) act on influence, the
    last two on the head only; given where they would do nothing, they are refused (see `resolve_ranking`).
    The table is sorted by rank (1 = the highest score, the first to suspect of a wrong label) and
    `output` gets a JSON sidecar `output + '.json'` with the parameters and input hashes. An existing
    output or sidecar is replaced only with `overwrite`.
    """
    reporter = reporter or Reporter()
    model_options = model_options or ModelOptions()
    run_options = run_options or RunOptions()
    with all_or_none():  # under torchrun: every process stops here if any check failed, before any work
        boundary = (boundary or BoundaryOptions()).resolved()
        ranking = resolve_ranking(method, boundary.kind, measure=influence_measure, curvature=curvature,
                                  damping=damping)
        if output is not None:
            table_format(output)
            sidecar_path = None if is_stdio(output) else output + ".json"
            check_outputs_clear_of_inputs(
                {"-o": output, "the sidecar": sidecar_path},
                {"checkpoint": checkpoint, "manifest": manifest, "--val": boundary.val,
                 "--classes file": model_options.classes},
            )
            if writes_here():
                check_overwrite({"-o": output, "the sidecar": sidecar_path}, overwrite)
    with all_or_none():  # a bad image or non-finite output in any process's rows stops them all
        prepared = prepare(checkpoint, manifest, model_options)
        for note in prepared.notes:
            reporter.info(note)
        labels = torch.from_numpy(prepared.labels)
        shard = shard_of(len(labels))  # None with one process
        budget = MemoryBudget(run_options.memory_budget)
        if boundary.kind == "head":
            outputs = run_forward(prepared, run_options, reporter, shard, budget)
        else:
            layer = refit_layer(prepared, boundary)
            if boundary.val and layer != "auto":
                reporter.info(f"--val: no layer to choose ({prepared.arch} is probed at {layer}); not used")
            if layer == "auto":
                held_out = read_val(prepared, boundary.val, model_options, run_options, reporter) if boundary.val else None
                sample_rows, candidates = read_choice_sample(prepared, boundary.choice_rows, run_options, reporter, shard)
            else:
                features = read_layer(prepared, layer, run_options, reporter, shard, budget)
                choice = LayerChoice(layer, "given")
    if boundary.kind == "refit" and layer == "auto":
        # the gather lies between two agreement blocks: no collective inside one
        choice = choose_on_sample(sample_rows, candidates, labels, len(prepared.classes), boundary.l2, reporter, shard,
                                  held_out)
        del held_out
        with all_or_none():
            features = read_rest(prepared, choice.layer, sample_rows, candidates, run_options, reporter, shard, budget)
        del candidates
    if method == "auto":
        reporter.info(f"method: {ranking.method} ({ranking.how})")
    local_labels = local_rows(labels, shard)
    if boundary.kind == "head":
        logits = outputs.logits
        scores, details = method_scores(
            ranking.method, outputs.logits, outputs.head_inputs, local_labels,
            has_bias=prepared.head.bias is not None, damping=ranking.damping, measure=ranking.measure,
            curvature=ranking.curvature, shard=shard,
        )
        details["boundary"] = "head"
        details.update(method_details(method, ranking.how))
        del outputs
    else:
        scores, logits = refit_scores(features, local_labels, len(prepared.classes), method=ranking.method,
                                      measure=ranking.measure, l2=boundary.l2, shard=shard, budget=budget)
        details = {**refit_details(choice, boundary, ranking, len(labels), len(prepared.classes), features.shape[1]),
                   **method_details(method, ranking.how)}
        del features
    predictions = prediction_rows(logits, local_labels, budget)
    if shard is not None:  # every process gets every row's results, in manifest order
        scores = shard.gather_into(scores, torch.empty(shard.total, dtype=scores.dtype))
        predictions = shard.gather_into(predictions, budget.array(shard.total, predictions.shape[1], torch.float64))
    del logits, labels, local_labels
    # the math is done: from here on the labels are class numbers of the smallest type (a byte a row for up to
    # 256 classes), where the math's int64 took eight
    prepared.labels = compact_codes(prepared.labels, len(prepared.classes))
    ranked = RankedScores(
        prepared.manifest,
        ids=prepared.manifest.ids,
        paths=prepared.manifest.paths,
        labels=prepared.labels,
        classes=prepared.classes,
        predictions=predictions,
        scores=scores.numpy(),
    )
    sidecar = {
        "irank_version": __version__,
        "command": "score",
        "method": ranking.method,
        "parameters": {
            **details,
            "arch": prepared.arch,
            "head": prepared.head_name,
            "preprocess": prepared.preprocess.to_dict(),
            "batch_size": run_options.batch_size,
            **placement_details(run_options.placement(prepared.model)),
        },
        "classes": prepared.classes,
        "class_source": prepared.class_source,
        "num_samples": len(ranked),
        "skipped_rows": prepared.skipped,
        "inputs": {
            "checkpoint": {"path": checkpoint, "sha256": sha256_file(checkpoint)},
            "manifest": {"path": manifest, "sha256": prepared.manifest.table_source.sha256()},  # a pipe: its copy
            **({"val": {"path": boundary.val, "sha256": sha256_file(boundary.val)}}
               if boundary.kind == "refit" and boundary.val else {}),
        },
    }
    with all_or_none():  # a failed write on rank 0 fails every process
        if output is not None and writes_here():
            with output_set(overwrite), reporter.task("writing the scores", len(ranked)) as advance:
                write_blocks(counted(ranked.blocks(), advance), output, quoting=ranked.csv_quoting())
                if not is_stdio(output):
                    write_json_atomic(output + ".json", sidecar)
    return ScoreResult(ranked=ranked, sidecar=sidecar)
