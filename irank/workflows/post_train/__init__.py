"""`irank post-train`: refine a model trained on noisy labels and rank its rows under the refined model.

Four strategies (see `post_train`): unlearn (the default: one noise-robust fine-tune on every row, then every
row ranked under the fine-tuned model: `unlearn.py`), crossfit (that fine-tune on each half of the rows, every
row ranked in and out of sample, then a fine-tune on the rows kept: `crossfit.py`), rejudge (rounds of rank all
rows, remove the top budget, fine-tune on the rest) and gradual (the paper's loop: score, remove the rows ranked
first, refine, round by round): `rounds.py`. The --out-dir and resuming: `run_dir.py`; a ranking and the final
judgement: `ranking.py`; torchrun's private folders: `sharing.py`; the record of a run, summary.json:
`irank.formats.summary`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from irank.options import RECIPES, LoopOptions, ModelOptions, RunOptions, TrainOptions
from irank.runtime.distributed import active, all_or_none, local_outputs, writes_here
from irank.runtime.errors import UsageError
from irank.runtime.progress import Reporter
from irank.workflows.post_train.crossfit import crossfit
from irank.workflows.post_train.rounds import plan_rounds, run_rounds
from irank.workflows.post_train.run_dir import run_config, start, undone_unless_started
from irank.workflows.post_train.unlearn import unlearn

__all__ = ["PostTrainResult", "plan_rounds", "post_train"]


@dataclass
class PostTrainResult:
    summary: dict = field(default_factory=dict)  # summary.json's contents
    final_model: str = ""


def post_train(
    checkpoint: str,
    manifest: str,
    *,
    out_dir: str,
    loop: LoopOptions | None = None,
    train_options: TrainOptions | None = None,
    val: str | None = None,
    model_options: ModelOptions | None = None,
    run_options: RunOptions | None = None,
    reporter: Reporter | None = None,
    on_round: Callable[[dict], None] | None = None,
    overwrite: bool = False,
) -> PostTrainResult:
    """Refine `checkpoint`, a model trained on the noisy labels of `manifest`, and rank every row under it.

    `loop.strategy` unlearn (the default unless rounds or a step are given): fine-tune the whole network once on
    every row with the noise-robust GCE loss, strong augmentation and a high learning rate (RECIPES), which
    unlearns the labels it memorized; then rank every row by the fine-tuned model's own loss and remove the top
    `budget` (or, without one, the share whose label the fine-tuned model disagrees with). Writes
    DIR/final.safetensors, DIR/scores.csv, DIR/kept.csv, DIR/removed.csv and DIR/summary.json; with `val` the
    fine-tune keeps its best epoch. Nothing is removed before the fine-tune, so it needs no budget to train.

    crossfit: the same fine-tune once on each half of the rows (DIR/fold0.csv, DIR/fold1.csv, stratified by label),
    every row ranked by the mean of its loss's rank share under the model that trained on it and under the one
    that did not (`irank.core.crossfit`), the top `budget` removed (without one: the share whose label the model
    that trained on it disagrees with), then the checkpoint fine-tuned on the rows kept into final.safetensors.
    Twice unlearn's training; one process only.

    gradual, the paper's loop: round r scores the samples kept so far under the model of round r−1, removes the top `step` share
    (of the original size), and refines on the rest. With `val`, the loop stops once validation
    accuracy has not improved for `patience` rounds, and the best round becomes `final.safetensors`;
    without it, the last round does. Without a budget, the share to remove is estimated from the
    first round's scores (see irank.core.estimate).

    rejudge: round r instead ranks every row of `manifest` under round r−1's model, removes the
    top `budget` share and refines that model on the rest. Round 1 ranks on `loop.boundary` (the input
    checkpoint); rounds 2 on rank on the refined model's own head, which was trained without the last
    round's suspects (`loop.rejudge_boundary` "same": on `loop.boundary` again, a `--layer auto` chosen
    afresh for each round's model). A model refined without the suspects unlearns the labels the input
    memorized, so its ranking is better than the input's; and a row removed wrongly in one round is kept
    in the next. The answer is a final judgement: every row ranked once more under final.safetensors (the
    last round's model, or the best on `val`), on the boundary a further round would use, and the top
    `budget` of them removed (DIR/scores.csv, DIR/kept.csv, DIR/removed.csv).

    Run again with the same arguments, it resumes after the last finished round (unlearn: after the fine-tune's
    last finished epoch); with `overwrite` it discards an earlier run in `out_dir` and starts afresh.

    Under torchrun every process runs the same rounds and takes the same decisions from the same
    gathered scores; rank 0 works in `out_dir`, the others in a private temporary folder of their own
    (removed at the end), so no shared filesystem is needed for the rounds' files.
    """
    with all_or_none():
        loop = (loop or LoopOptions()).resolved(val)
        train_options = (train_options or TrainOptions()).resolved(RECIPES[loop.strategy].training)
        loop.validate()
        if loop.crossfit and active():
            raise UsageError("--strategy crossfit runs in one process: under torchrun choose unlearn, rejudge or "
                             "gradual")
        if loop.rejudge and loop.boundary == "refit" and train_options.scope == "refit":
            raise UsageError("--rejudge with --boundary refit needs --scope full or head: a probe refit on the input's "
                             "unchanged features would rank every row the same in every round")
    arguments = (checkpoint, manifest, loop, train_options, val, model_options or ModelOptions(),
                 run_options or RunOptions(), reporter or Reporter(), on_round, overwrite)
    if writes_here():
        with undone_unless_started(Path(out_dir)):
            return _run(Path(out_dir), *arguments)
    with tempfile.TemporaryDirectory(prefix="irank-post-train-") as private, local_outputs():
        result = _run(Path(private), *arguments)
    return replace(result, final_model=str(Path(out_dir) / "final.safetensors"))


def _run(out: Path, checkpoint: str, manifest: str, loop: LoopOptions, train_options: TrainOptions, val: str | None,
         model_options: ModelOptions, run: RunOptions, reporter: Reporter, on_round: Callable[[dict], None] | None,
         overwrite: bool) -> PostTrainResult:
    state, original_rows = start(out, checkpoint, manifest, val,
                                 run_config(checkpoint, manifest, val, loop, train_options, model_options),
                                 model_options, overwrite)
    state.strategy = loop.strategy
    if loop.unlearn:
        state = unlearn(checkpoint, manifest, out, loop, train_options, val, model_options, run, reporter, state,
                        original_rows)
    elif loop.crossfit:
        state = crossfit(checkpoint, manifest, out, loop, train_options, val, model_options, run, reporter, state,
                         original_rows)
    else:
        state = run_rounds(checkpoint, manifest, out, loop, train_options, val, model_options, run, reporter, state,
                           original_rows, on_round)
    return PostTrainResult(summary=state.to_dict(), final_model=str(out / "final.safetensors"))
