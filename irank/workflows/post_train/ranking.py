"""One ranking of post-train, and the removal it decides: a round's, or the final judgement of unlearn and rejudge."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from irank.core.estimate import estimate_noise_share
from irank.formats.files import output_set, remove_path
from irank.options import LoopOptions, ModelOptions, RunOptions
from irank.runtime.distributed import all_or_none
from irank.runtime.progress import Reporter
from irank.stages.prune import prune
from irank.stages.score import ScoreResult, score
from irank.workflows.post_train.run_dir import building

JUDGEMENT_FILES = ("scores.csv", "scores.csv.json", "kept.csv", "kept.csv.json", "removed.csv")


def warn_of_a_large_budget(share: float, reporter: Reporter) -> None:
    """An estimated budget above half the rows is more than any ranking supports: when most labels disagree with
    the model, it is the model (or how it reads the data) that is in doubt, not the labels."""
    if share > 0.5:
        reporter.warn(f"the estimated budget removes {share:.0%} of the rows, more than half: no ranking supports "
                      "that; check the model fits this data (irank eval), or give --budget")


def removal_count(step: float, original_rows: int) -> int:
    return max(1, int(round(step * original_rows)))


def score_round(loop: LoopOptions, number: int, model: str, manifest: str, output: Path, model_options: ModelOptions,
                run: RunOptions, reporter: Reporter, layer: str | None = None, val: str | None = None,
                overwrite: bool = False):
    """Round `number`'s ranking of `manifest` under `model`, on that round's boundary and method, into `output`."""
    return score(model, manifest, output=str(output), method=loop.round_method(number), **loop.round_flags(number),
                 boundary=loop.round_boundary(number, layer, val), model_options=model_options, run_options=run,
                 reporter=reporter, overwrite=overwrite)


def prune_round(loop: LoopOptions, scores: Path, manifest: str, folder: Path, count: int, scored_rows: int):
    """Remove `count` of the `scored_rows` rows ranked first in `scores` from `manifest`: kept.csv and removed.csv in
    `folder` (under torchrun every process prunes its own copy of the same table alike)."""
    removal = {"count": count} if not loop.per_class else {"fraction": min(0.99, count / scored_rows)}
    with all_or_none():
        return prune(str(scores), manifest, output=str(folder / "kept.csv"), removed_output=str(folder / "removed.csv"),
                     per_class=loop.per_class, min_per_class=loop.min_per_class, overwrite=True, **removal)


def ranked_by(sidecar: dict) -> dict:
    """What a scores table ranked by, for its record: boundary, layer (on a refit probe) and method."""
    parameters = sidecar["parameters"]
    layer = {"layer": parameters["layer"]} if parameters["boundary"] == "refit" else {}
    return {"boundary": parameters["boundary"], **layer, "method": sidecar["method"]}


def judge(out: Path, manifest: str, loop: LoopOptions, number: int, budget: float | None, original_rows: int,
          model_options: ModelOptions, run: RunOptions, reporter: Reporter,
          publish_with: Callable[[dict], None], rank: Callable[[Path], ScoreResult] | None = None,
          judged_by: str = "final.safetensors", estimated_by: str = "the fine-tuned model's") -> dict:
    """The answer of --rejudge and unlearn: every input row ranked under final.safetensors, on the boundary a round
    `number` would use, and the top `budget` of them removed (without one, the share estimated from this ranking:
    the rows whose label the final model disagrees with): DIR/scores.csv, DIR/kept.csv and DIR/removed.csv. Under
    --rejudge the final model is the best (on ce-sym40 its ranking beat the last round's, made under the model
    before it). `publish_with(judgement)` writes what goes out with the judgement's files (summary.json), as one set.
    `rank(path)`: another ranking of every row, written to `path` (crossfit's, by the models `judged_by`, whose
    predictions `estimated_by` names)."""
    started = time.perf_counter()
    # built beside DIR, at its depth (relative paths stay valid), then published with summary.json as one set
    folder = out.parent / f".{out.name}.judgement.tmp"
    remove_path(folder)
    with building(folder):
        if rank is None:
            table = score_round(loop, number, str(out / "final.safetensors"), manifest, folder / "scores.csv",
                                model_options, run, reporter, overwrite=True)
        else:
            table = rank(folder / "scores.csv")
        estimate = None
        if budget is None:
            estimate = estimate_noise_share(table.table)
            budget = estimate["share"]
            reporter.info(f"budget: remove {budget:.1%}, estimated as the {estimate['reason']} ({estimated_by})")
            warn_of_a_large_budget(budget, reporter)
        pruned = prune_round(loop, folder / "scores.csv", manifest, folder, removal_count(budget, original_rows),
                             len(table.table))
        reporter.info(f"final judgement under {judged_by}: removed {pruned.summary['removed_rows']}, "
                      f"kept {pruned.summary['kept_rows']}")
        judgement = {"model": judged_by, **ranked_by(table.sidecar), "budget": budget,
                     **({"estimate": estimate} if estimate else {}),
                     "removed": pruned.summary["removed_rows"], "kept": pruned.summary["kept_rows"],
                     "removed_per_class": pruned.summary["removed_per_class"], "seconds": time.perf_counter() - started}
        with output_set(overwrite=True) as outputs:
            for name in JUDGEMENT_FILES:
                outputs.add(folder / name, out / name)
            publish_with(judgement)
    shutil.rmtree(folder, ignore_errors=True)
    return judgement
