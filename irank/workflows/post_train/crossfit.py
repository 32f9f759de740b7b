"""Strategy crossfit: the unlearn fine-tune once on each half of the rows, every row judged by both models (in and
out of sample, `irank.core.crossfit`), then the checkpoint fine-tuned on the rows kept.

DIR/fold0.csv and DIR/fold1.csv hold the halves (stratified by label, seeded), DIR/fold0.safetensors and
DIR/fold1.safetensors their models; the judgement's files are unlearn's (scores.csv, kept.csv, removed.csv) and
DIR/final.safetensors is the fine-tune on kept.csv. Each fine-tune resumes from its last finished epoch.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from irank.core.crossfit import HALVES, halves, in_and_out, pick_rows
from irank.core.estimate import issue_summary
from irank.formats.columns import codes_and_values
from irank.formats.files import write_json_atomic
from irank.formats.manifest import Manifest, read_manifest, write_blocks
from irank.formats.scores_table import RankedScores
from irank.formats.summary import Summary
from irank.options import LoopOptions, ModelOptions, RunOptions, TrainOptions
from irank.runtime.progress import Reporter
from irank.stages.evaluate import evaluate
from irank.stages.prune import write_rows
from irank.stages.score import ScoreResult, score
from irank.workflows.post_train.ranking import judge
from irank.workflows.post_train.run_dir import save_state
from irank.workflows.post_train.unlearn import fine_tune, warn_unless_better

SEED = 0  # the halves' shuffle: fixed, so that a resumed run fine-tunes on the same halves


def fold_halves(samples: Manifest) -> np.ndarray:
    """Each row's half (0 or 1), stratified by its given label."""
    codes, _ = codes_and_values(samples.labels)
    return halves(torch.from_numpy(np.asarray(codes, dtype=np.int64)), SEED).numpy()


def write_folds(samples: Manifest, manifest: str, out: Path, half: np.ndarray) -> None:
    """DIR/fold0.csv and DIR/fold1.csv: the manifest's rows of each half, in its order and with its columns."""
    for k in range(HALVES):
        write_rows(samples, half == k, str(out / f"fold{k}.csv"),
                   {"command": "post-train", "crossfit_half": k, "rows": int((half == k).sum()),
                    "of_rows": len(half), "inputs": {"manifest": {"path": manifest}}})


def _whole(predictions) -> torch.Tensor:
    """Packed prediction rows in memory (a DiskRows is read whole: eight float64 numbers a row)."""
    return predictions if isinstance(predictions, torch.Tensor) else predictions[0:len(predictions)]


def rank_in_and_out(out: Path, manifest: str, loop: LoopOptions, half: np.ndarray, model_options: ModelOptions,
                    run: RunOptions, reporter: Reporter, output: Path) -> ScoreResult:
    """Every row scored under both half models on their heads (`loop`'s method: the loss by default), ranked by
    `in_and_out`, written to `output` with its sidecar. The table's predictions are each row's in sample (the
    model that trained on it), as unlearn's are, so its disagreement estimates the budget as unlearn's does."""
    method = loop.round_method(1)
    results = [score(str(out / f"fold{k}.safetensors"), manifest, method=method, **loop.round_flags(1),
                     boundary=loop.round_boundary(1), model_options=model_options, run_options=run, reporter=reporter)
               for k in range(HALVES)]
    first, second = (result.ranked for result in results)
    scored = np.ones(len(half), dtype=bool)  # --on-bad-image skip leaves rows out of both tables alike
    scored[[item["row"] - 1 for item in results[0].sidecar["skipped_rows"]]] = False
    split = torch.from_numpy(half[scored])
    scores = in_and_out((torch.from_numpy(first.scores), torch.from_numpy(second.scores)), split)
    predictions = pick_rows((_whole(first.predictions), _whole(second.predictions)), split, in_sample=True)
    ranked = RankedScores(first.user_rows, ids=first.ids, paths=first.paths, labels=first.labels,
                          classes=list(first.class_names), predictions=predictions, scores=scores.numpy())
    sidecar = copy.deepcopy(results[0].sidecar)
    sidecar["parameters"]["crossfit"] = {
        "models": [f"fold{k}.safetensors" for k in range(HALVES)], "halves": [f"fold{k}.csv" for k in range(HALVES)],
        "score": f"the mean of each row's rank share of its {method} in sample and out of sample",
        "predictions": "in sample (under the half model that trained on the row)"}
    sidecar["inputs"]["checkpoint"] = [results[k].sidecar["inputs"]["checkpoint"] for k in range(HALVES)]
    verdicts = ranked.verdict_columns()
    sidecar["summary"] = issue_summary(verdicts["label"], verdicts["predicted"], list(first.class_names))
    write_blocks(ranked.blocks(), str(output), quoting=ranked.csv_quoting())
    write_json_atomic(str(output) + ".json", sidecar)
    return ScoreResult(ranked=ranked, sidecar=sidecar)


def crossfit(checkpoint: str, manifest: str, out: Path, loop: LoopOptions, train_options: TrainOptions,
             val: str | None, model_options: ModelOptions, run: RunOptions, reporter: Reporter, state: Summary,
             original_rows: int) -> Summary:
    """The two half fine-tunes, the judgement, the fine-tune on the rows kept (each skipped where a resumed run
    finished it); the run's record."""
    inside = replace(model_options, allow_outside_root=True)  # the halves and kept.csv point back into the data
    if val and state.input_val_accuracy is None:
        state.input_val_accuracy = evaluate(checkpoint, val, model_options=model_options, run_options=run)["accuracy"]
    samples = read_manifest(manifest)
    half = fold_halves(samples)
    state.folds = state.folds or []
    if not state.folds:
        write_folds(samples, manifest, out, half)
    del samples
    for k in range(len(state.folds), HALVES):
        save_state(out, state)  # before each fine-tune: a run stopped in it resumes from its last epoch
        record = fine_tune(checkpoint, str(out / f"fold{k}.csv"), out, train_options, val, inside, run, reporter,
                           int((half == k).sum()), model=f"fold{k}.safetensors", what=f"half {k + 1} of {HALVES}")
        state.folds = [*state.folds, {"half": k, "manifest": f"fold{k}.csv", "rows": int((half == k).sum()), **record}]
        save_state(out, state)
    if state.judgement is None:
        def publish(judgement: dict) -> None:
            state.judgement = judgement
            state.plan = {"budget": judgement["budget"],
                          "budget_source": "--budget" if loop.budget is not None else "estimated"}
            save_state(out, state)

        judge(out, manifest, loop, 1, loop.budget, original_rows, inside, run, reporter, publish,
              rank=lambda path: rank_in_and_out(out, manifest, loop, half, inside, run, reporter, path),
              judged_by="fold0.safetensors and fold1.safetensors",
              estimated_by="each row's under the half model that trained on it")
    if state.refined is None:
        save_state(out, state)
        state.refined = fine_tune(checkpoint, str(out / "kept.csv"), out, train_options, val, inside, run, reporter,
                                  state.judgement["kept"], what="refining on the rows kept")
        state.finished = True
        save_state(out, state)
    warn_unless_better(state.refined, state, reporter)
    return state
