"""Strategy unlearn (post-train's default): one noise-robust fine-tune of the whole network on every row, which
unlearns the labels the input memorized, then every row judged under the fine-tuned model."""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from irank.core.joint import joint_loss
from irank.formats.files import atomic_path
from irank.formats.summary import Summary
from irank.model.margin_log import MarginLog
from irank.options import LoopOptions, ModelOptions, RunOptions, TrainOptions
from irank.runtime.distributed import active
from irank.runtime.progress import Reporter
from irank.stages.evaluate import evaluate
from irank.stages.refine import refine
from irank.stages.score import ScoreResult, score, write_scores
from irank.workflows.post_train.ranking import judge
from irank.workflows.post_train.run_dir import save_state
from irank.workflows.post_train.sharing import share_file

MARGINS = "margins.safetensors"  # each row's area under the margin over the fine-tune (irank.core.margins)
AUM_LOSS = "aum-loss"
AUM_LOSS_HOW = ("auto: the fine-tune's area under the margin and the fine-tuned model's loss, their ranks averaged "
                "(docs/benchmarks/posttrain-default.md)")


def fine_tune(checkpoint: str, manifest: str, out: Path, train_options: TrainOptions, val: str | None,
              model_options: ModelOptions, run: RunOptions, reporter: Reporter, rows: int,
              model: str = "final.safetensors", what: str = "unlearning", margins: MarginLog | None = None) -> dict:
    """The fine-tune of `checkpoint` on `manifest` (`rows` rows) into DIR/`model`; it saves its state after every
    epoch (not under torchrun), so the same command run again continues it. With `margins`, every step's margins
    are logged there and each row's area under the margin written to DIR/margins.safetensors. Returns its record
    (`unlearned` in summary.json)."""
    started = time.perf_counter()
    reporter.info(f"{what}: fine-tuning {train_options.scope} for {train_options.epochs} epochs on {rows} rows "
                  f"({train_options.loss} loss, learning rate {train_options.lr}, augment {train_options.augment})")
    refined = refine(checkpoint, manifest, output=str(out / model), defaults=train_options, val=val,
                     model_options=model_options, run_options=run, reporter=reporter, overwrite=True,
                     resume="auto" if not active() else False, margins=margins)
    if margins is not None:  # every process: the sum is collective, and each writes its own folder's copy
        area = margins.area_under_margin()
        with atomic_path(out / MARGINS) as path:
            save_file({"area_under_margin": area.contiguous()}, str(path))
    record = {"model": model, "epochs": train_options.epochs, "best_epoch": refined.best_epoch,
              "seconds": time.perf_counter() - started, **({"margins": MARGINS} if margins is not None else {})}
    if val:
        record["val_accuracy"] = max(r["val_accuracy"] for r in refined.history)
    return record


def unlearn(checkpoint: str, manifest: str, out: Path, loop: LoopOptions, train_options: TrainOptions,
            val: str | None, model_options: ModelOptions, run: RunOptions, reporter: Reporter, state: Summary,
            original_rows: int) -> Summary:
    """The fine-tune (unless a resumed run finished it), then the judgement; the run's record."""
    if val and state.input_val_accuracy is None:
        state.input_val_accuracy = evaluate(checkpoint, val, model_options=model_options, run_options=run)["accuracy"]
    if state.unlearned is None:
        save_state(out, state)  # before the fine-tune: a run stopped in it resumes from its last epoch
        state.unlearned = fine_tune(checkpoint, manifest, out, train_options, val, model_options, run, reporter,
                                    original_rows, margins=MarginLog() if logs_margins(train_options) else None)
        save_state(out, state)
    elif active():
        share_file(out, "final.safetensors")
        if "margins" in state.unlearned:
            share_file(out, MARGINS)
    if state.judgement is None:
        def finish(judgement: dict) -> None:
            state.judgement = judgement
            state.plan = {"budget": judgement["budget"],
                          "budget_source": "--budget" if loop.budget is not None else "estimated"}
            state.finished = True
            save_state(out, state)

        inside = replace(model_options, allow_outside_root=True)
        wanted = judged_by_margins(loop, train_options)
        by_margins = wanted and "margins" in state.unlearned
        if wanted and not by_margins:
            reporter.warn(f"{out} holds a fine-tune of an earlier irank, without its margins: judging by the "
                          "fine-tuned model's loss alone (--overwrite starts afresh)")
        judge(out, manifest, loop, 1, loop.budget, original_rows, inside, run, reporter, finish,
              rank=(lambda path: rank_by_margins(out, manifest, loop, inside, run, reporter, path)) if by_margins else None)
    warn_unless_better(state.unlearned, state, reporter)
    return state


def judged_by_margins(loop: LoopOptions, train_options: TrainOptions) -> bool:
    """Whether unlearn's judgement ranks by AUM_LOSS: under --method auto on the fine-tuned model's head (the
    default), after a fine-tune that takes steps; another --method, or --boundary refit, ranks by that alone, as
    does a fine-tune with --scope refit (no steps, no margins)."""
    return loop.method == "auto" and loop.round_boundary(1).kind == "head" and logs_margins(train_options)


def logs_margins(train_options: TrainOptions) -> bool:
    """Whether the fine-tune logs margins: every scope but refit (a head refit from scratch takes no steps)."""
    return train_options.scope != "refit"


def rank_by_margins(out: Path, manifest: str, loop: LoopOptions, model_options: ModelOptions, run: RunOptions,
                    reporter: Reporter, output: Path) -> ScoreResult:
    """Every row's loss under DIR/final.safetensors and its area under the margin over the fine-tune
    (DIR/margins.safetensors), their rank shares averaged (`irank.core.joint`): the table written to `output`.
    Its predictions are the final model's, so the budget is estimated from them as under the loss alone."""
    result = score(str(out / "final.safetensors"), manifest, method="loss", boundary=loop.round_boundary(1),
                   model_options=model_options, run_options=run, reporter=reporter)
    area = load_file(str(out / MARGINS))["area_under_margin"]
    if len(area) != len(result.ranked.scores):
        raise RuntimeError(f"{out / MARGINS} holds {len(area)} rows; the final model scored {len(result.ranked.scores)}")
    ranked = result.ranked.rescored(joint_loss(area.neg(), torch.from_numpy(result.ranked.scores)).numpy())
    sidecar = copy.deepcopy(result.sidecar)
    sidecar["method"] = AUM_LOSS
    sidecar["parameters"]["margins"] = {"file": MARGINS, "score": AUM_LOSS_HOW}
    reporter.info(f"method: {AUM_LOSS} ({AUM_LOSS_HOW})")
    write_scores(ranked, sidecar, str(output), True, reporter)
    return ScoreResult(ranked=ranked, sidecar=sidecar)


def warn_unless_better(record: dict, state: Summary, reporter: Reporter) -> None:
    """Say so when the fine-tune that made final.safetensors (`record`) validated below the input (with --val)."""
    if "val_accuracy" in record and record["val_accuracy"] < state.input_val_accuracy:
        reporter.warn(f"the fine-tuned model ({record['val_accuracy']:.4f} on --val) did not beat the input "
                      f"checkpoint ({state.input_val_accuracy:.4f}); final.safetensors is its best epoch")
