"""`irank score`: checkpoint + manifest → per-sample influence and influential rank."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from irank._version import __version__
from irank.core.estimate import issue_summary
from irank.core.head_scores import method_scores
from irank.core.layer_choice import LayerChoice
from irank.core.probe import probe_curvature, refit_scores
from irank.formats.columns import compact_codes
from irank.formats.files import (
    check_outputs_clear_of_inputs,
    check_overwrite,
    is_stdio,
    output_set,
    sha256_file,
    write_json_atomic,
)
from irank.formats.manifest import manifest_sha256, table_format, write_blocks
from irank.formats.scores_table import RankedScores, prediction_rows
from irank.model.forward import run_forward
from irank.model.placement import Placement, placement_for
from irank.model.prepare import Prepared, prepare
from irank.model.probe_features import probe_features
from irank.options import BoundaryOptions, ModelOptions, Ranking, RunOptions, resolve_ranking, units_needed
from irank.runtime.distributed import (
    Shard,
    all_or_none,
    local_rows,
    shard_of,
    writes_here,
)
from irank.runtime.memory import MemoryBudget
from irank.runtime.progress import Reporter


@dataclass
class ScoreResult:
    ranked: RankedScores  # the scores table, built a block of rows at a time
    sidecar: dict  # provenance, as written next to the output

    @property
    def table(self) -> pd.DataFrame:
        """The whole scores table, sorted by rank (built on first use: at millions of rows, a GB of strings)."""
        return self.ranked.frame()


# --layer auto reads every candidate layer on a seeded random sample of rows, chooses there, then runs the
# other rows only up to the chosen layer: less than one forward pass. Under torchrun the sample's features are
# gathered between the two reads, so the choice is made on the same rows as by one process.


# Row lists are numpy arrays here: at a million rows, Python lists of ints cost tens of MiB each.


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
    if choice.head_label_fit is not None:
        details["head_label_fit"] = choice.head_label_fit
    if ranking.method == "influence":
        details["curvature"] = probe_curvature(rows, num_classes, dims + 1)
    if choice.figures:
        details["layers"] = choice.figures
    return details


def _check_request(checkpoint: str, manifest: str, output: str | None, boundary: BoundaryOptions,
                   model_options: ModelOptions, overwrite: bool) -> None:
    """The output is a table format, none of the inputs, and new (or --overwrite)."""
    if output is None:
        return
    table_format(output)
    sidecar_path = None if is_stdio(output) else output + ".json"
    check_outputs_clear_of_inputs(
        {"-o": output, "the sidecar": sidecar_path},
        {"checkpoint": checkpoint, "manifest": manifest, "--val": boundary.val, "--classes file": model_options.classes},
    )
    if writes_here():
        check_overwrite({"-o": output, "the sidecar": sidecar_path}, overwrite)


def _head_scores(prepared: Prepared, ranking: Ranking, run: RunOptions, reporter: Reporter, shard: Shard | None,
                 budget: MemoryBudget) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(scores, logits, what the sidecar says) on the checkpoint's own head, of the rows this process holds."""
    with all_or_none():  # a bad image or non-finite output in any process's rows stops them all
        outputs = run_forward(prepared, run, reporter, shard, budget)
    scores, details = method_scores(ranking.method, outputs.logits, outputs.head_inputs,
                                    local_rows(torch.from_numpy(prepared.labels), shard),
                                    has_bias=prepared.head.bias is not None, damping=ranking.damping,
                                    measure=ranking.measure, curvature=ranking.curvature, shard=shard)
    return scores, outputs.logits, {**details, "boundary": "head"}


def _probe_scores(prepared: Prepared, boundary: BoundaryOptions, ranking: Ranking, model_options: ModelOptions,
                  run: RunOptions, reporter: Reporter, shard: Shard | None,
                  budget: MemoryBudget) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(scores, logits, what the sidecar says) on an L2 probe refit at the boundary's layer; with the joint loss,
    the probe's loss and the head's, their ranks averaged (the head's logits read in the same pass)."""
    read = probe_features(prepared, boundary, model_options, run, reporter, shard, budget,
                          with_head=ranking.method == "joint-loss")
    labels = torch.from_numpy(prepared.labels)
    scores, logits = refit_scores(read.features, local_rows(labels, shard), len(prepared.classes),
                                  method=ranking.method, measure=ranking.measure, l2=boundary.l2, shard=shard,
                                  budget=budget, head_logits=read.head_logits)
    return scores, logits, refit_details(read.choice, boundary, ranking, len(labels), len(prepared.classes),
                                         read.features.shape[1])


def _ranked(prepared: Prepared, scores: torch.Tensor, logits, shard: Shard | None, budget: MemoryBudget) -> RankedScores:
    """The scores table of every row (gathered from every process under torchrun), in rank order."""
    predictions = prediction_rows(logits, local_rows(torch.from_numpy(prepared.labels), shard), budget)
    if shard is not None:  # every process gets every row's results, in manifest order
        scores = shard.gather_into(scores, torch.empty(shard.total, dtype=scores.dtype))
        predictions = shard.gather_into(predictions, budget.array(shard.total, predictions.shape[1], torch.float64))
    # the math is done: from here on the labels are class numbers of the smallest type (a byte a row for up to
    # 256 classes), where the math's int64 took eight
    prepared.labels = compact_codes(prepared.labels, len(prepared.classes))
    return RankedScores(prepared.manifest, ids=prepared.manifest.ids, paths=prepared.manifest.paths,
                        labels=prepared.labels, classes=prepared.classes, predictions=predictions,
                        scores=scores.numpy())


def _sidecar(checkpoint: str, manifest: str, prepared: Prepared, ranking: Ranking, details: dict,
             boundary: BoundaryOptions, run: RunOptions, rows: int) -> dict:
    """The provenance written beside the table: what was computed, on what, from which inputs."""
    return {
        "irank_version": __version__,
        "command": "score",
        "method": ranking.method,
        "parameters": {**details, "arch": prepared.arch, "head": prepared.head_name,
                       "preprocess": prepared.preprocess.to_dict(), "batch_size": run.batch_size,
                       **placement_details(placement_for(run, prepared.model))},
        "classes": prepared.classes,
        "class_source": prepared.class_source,
        "num_samples": rows,
        "skipped_rows": prepared.skipped,
        "inputs": {
            "checkpoint": {"path": checkpoint, "sha256": sha256_file(checkpoint)},
            "manifest": {"path": manifest, "sha256": prepared.manifest.table_source.sha256()},  # a pipe: its copy
            **({"val": {"path": boundary.val, "sha256": manifest_sha256(boundary.val)}}
               if boundary.kind == "refit" and boundary.val else {}),
        },
    }


def write_scores(ranked: RankedScores, sidecar: dict, output: str | None, overwrite: bool, reporter: Reporter) -> None:
    """The table and its sidecar, as one set of outputs (rank 0 only; '-' streams the table to stdout)."""
    with all_or_none():  # a failed write on rank 0 fails every process
        if output is not None and writes_here():
            with output_set(overwrite), reporter.task("writing the scores", len(ranked)) as advance:
                write_blocks(counted(ranked.blocks(), advance), output, quoting=ranked.csv_quoting())
                if not is_stdio(output):
                    write_json_atomic(output + ".json", sidecar)


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
    with_units: bool = False,
) -> ScoreResult:
    """Score and rank every sample of `manifest` under `checkpoint`; write the table to `output` if given.

    `method` auto: influence on the head; on a refit probe the joint loss, the probe's loss and the head's with
    their ranks averaged (`irank.core.joint`, `irank.core.methods`). `with_units`: the scores will be gated on by
    value (`--fail-score`), so auto ranks by the probe's loss there and the joint loss by name is refused.
    `influence_measure` (default self-influence), `curvature` (auto) and `damping` (0.01) act on influence, the
    last two on the head only; given where they would do nothing, they are refused (see `resolve_ranking`).
    The table is sorted by rank (1 = the highest score, the first to suspect of a wrong label) and
    `output` gets a JSON sidecar `output + '.json'` with the parameters and input hashes. An existing
    output or sidecar is replaced only with `overwrite`.
    """
    reporter = reporter or Reporter()
    model_options = model_options or ModelOptions()
    run = run_options or RunOptions()
    with all_or_none():  # under torchrun: every process stops here if any check failed, before any work
        boundary = (boundary or BoundaryOptions()).resolved()
        ranking = resolve_ranking(method, boundary.kind, measure=influence_measure, curvature=curvature,
                                  damping=damping)
        ranking = units_needed(ranking) if with_units else ranking
        _check_request(checkpoint, manifest, output, boundary, model_options, overwrite)
    with all_or_none():
        prepared = prepare(checkpoint, manifest, model_options)
    for note in prepared.notes:
        reporter.info(note)
    for warning in prepared.warnings:
        reporter.warn(warning)
    shard = shard_of(len(prepared.labels))  # None with one process
    budget = MemoryBudget(run.memory_budget)
    if boundary.kind == "head":
        scores, logits, details = _head_scores(prepared, ranking, run, reporter, shard, budget)
    else:
        scores, logits, details = _probe_scores(prepared, boundary, ranking, model_options, run, reporter, shard, budget)
    if method == "auto":
        reporter.info(f"method: {ranking.method} ({ranking.how})")
    details.update(method_details(method, ranking.how))
    ranked = _ranked(prepared, scores, logits, shard, budget)
    del scores, logits
    verdicts = ranked.verdict_columns()
    if boundary.kind == "head":
        details["head_label_fit"] = float((verdicts["label"] == verdicts["predicted"]).mean())
    sidecar = _sidecar(checkpoint, manifest, prepared, ranking, details, boundary, run, len(ranked))
    sidecar["summary"] = issue_summary(verdicts["label"], verdicts["predicted"], prepared.classes)
    _warn_of_the_fit(checkpoint, details.get("head_label_fit"), sidecar["summary"], boundary.kind, reporter)
    write_scores(ranked, sidecar, output, overwrite, reporter)
    return ScoreResult(ranked=ranked, sidecar=sidecar)


# A checkpoint that predicts fewer of its own training labels than this is probably not the model of this data,
# or not read as it was trained (preprocessing, class order): a warning, not a tuned default.
POOR_FIT = 0.5


def _warn_of_the_fit(checkpoint: str, head_fit: float | None, summary: dict, boundary: str,
                     reporter: Reporter) -> None:
    """Say so when the ranking is likely unreliable: a checkpoint that fits its labels poorly, or an estimate of
    wrong labels above half the rows (no ranking separates wrong labels from right ones when most are wrong)."""
    if head_fit is not None and head_fit < POOR_FIT:
        reporter.warn(f"checkpoint {checkpoint} predicts only {head_fit:.0%} of the given labels: its ranking is "
                      "unreliable. Is it the model trained on these labels, read with its preprocessing "
                      "(--preprocess, --mean/--std) and class order (--classes)?")
    if summary["share"] > 0.5:
        reporter.warn(f"the {boundary} boundary disagrees with {summary['share']:.0%} of the given labels: more than "
                      "half, where no ranking tells wrong labels from right ones; check the model and its inputs")
