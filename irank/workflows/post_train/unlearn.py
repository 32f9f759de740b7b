"""Strategy unlearn (post-train's default): one noise-robust fine-tune of the whole network on every row, which
unlearns the labels the input memorized, then every row judged under the fine-tuned model."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from irank.formats.summary import Summary
from irank.options import LoopOptions, ModelOptions, RunOptions, TrainOptions
from irank.runtime.distributed import active
from irank.runtime.progress import Reporter
from irank.stages.evaluate import evaluate
from irank.stages.refine import refine
from irank.workflows.post_train.ranking import judge
from irank.workflows.post_train.run_dir import save_state
from irank.workflows.post_train.sharing import share_file


def fine_tune(checkpoint: str, manifest: str, out: Path, train_options: TrainOptions, val: str | None,
              model_options: ModelOptions, run: RunOptions, reporter: Reporter, rows: int,
              model: str = "final.safetensors", what: str = "unlearning") -> dict:
    """The fine-tune of `checkpoint` on `manifest` (`rows` rows) into DIR/`model`; it saves its state after every
    epoch (not under torchrun), so the same command run again continues it. Returns its record (`unlearned` in
    summary.json)."""
    started = time.perf_counter()
    reporter.info(f"{what}: fine-tuning {train_options.scope} for {train_options.epochs} epochs on {rows} rows "
                  f"({train_options.loss} loss, learning rate {train_options.lr}, augment {train_options.augment})")
    refined = refine(checkpoint, manifest, output=str(out / model), defaults=train_options, val=val,
                     model_options=model_options, run_options=run, reporter=reporter, overwrite=True,
                     resume="auto" if not active() else False)
    record = {"model": model, "epochs": train_options.epochs, "best_epoch": refined.best_epoch,
              "seconds": time.perf_counter() - started}
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
                                    original_rows)
        save_state(out, state)
    elif active():
        share_file(out, "final.safetensors")
    if state.judgement is None:
        def finish(judgement: dict) -> None:
            state.judgement = judgement
            state.plan = {"budget": judgement["budget"],
                          "budget_source": "--budget" if loop.budget is not None else "estimated"}
            state.finished = True
            save_state(out, state)

        judge(out, manifest, loop, 1, loop.budget, original_rows, replace(model_options, allow_outside_root=True),
              run, reporter, finish)
    warn_unless_better(state.unlearned, state, reporter)
    return state


def warn_unless_better(record: dict, state: Summary, reporter: Reporter) -> None:
    """Say so when the fine-tune that made final.safetensors (`record`) validated below the input (with --val)."""
    if "val_accuracy" in record and record["val_accuracy"] < state.input_val_accuracy:
        reporter.warn(f"the fine-tuned model ({record['val_accuracy']:.4f} on --val) did not beat the input "
                      f"checkpoint ({state.input_val_accuracy:.4f}); final.safetensors is its best epoch")
