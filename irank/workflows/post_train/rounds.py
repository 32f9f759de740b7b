"""Strategies gradual (the paper's loop) and rejudge: round after round, rank, remove, refine.

Round r of gradual scores the rows kept so far under round r−1's model, removes the top `step` share (of the
original size) and refines on the rest; rejudge instead ranks every input row under round r−1's model, removes
the top `budget` and refines that model on the rest, and ends with a judgement of every row. Each round is built
in a hidden folder and renamed `DIR/round-NN/` when complete, and summary.json with DIR/removed.csv is rewritten
after it, so an interrupted run resumes after its last finished round.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pandas as pd

from irank.core.estimate import estimate_noise_share
from irank.formats.files import atomic_path, output_set
from irank.formats.manifest import read_table, rebase_paths, write_table
from irank.formats.summary import ABSENT, RoundRecord, Summary
from irank.options import (
    DEFAULT_L2,
    DEFAULT_REJUDGE_ROUNDS,
    DEFAULT_ROUNDS,
    HEAD_INPUT,
    LoopOptions,
    ModelOptions,
    RunOptions,
    TrainOptions,
)
from irank.runtime.distributed import all_or_none, is_main
from irank.runtime.progress import Reporter
from irank.stages.evaluate import evaluate
from irank.stages.refine import refine
from irank.workflows.post_train.ranking import (
    judge,
    prune_round,
    ranked_by,
    removal_count,
    score_round,
    warn_of_a_large_budget,
)
from irank.workflows.post_train.run_dir import building, save_state
from irank.workflows.post_train.sharing import share_rounds


def plan_rounds(options: LoopOptions, estimated_budget: float | None = None) -> dict:
    """Rounds, step and budget from any two of them (or one plus the estimate, or the estimate alone)."""
    rounds, step, budget = options.rounds, options.step, options.budget
    source = "--budget" if budget is not None else None
    if budget is None and step is not None and rounds is not None:
        budget, source = step * rounds, "--rounds × --step"
    if budget is None:
        if estimated_budget is None:
            raise ValueError("the budget must be estimated first")
        budget, source = estimated_budget, "estimated"
    if options.rejudge:  # every round removes the whole budget, judged afresh over every row (--step is refused)
        return {"rounds": int(rounds or DEFAULT_REJUDGE_ROUNDS), "step": float(budget), "budget": float(budget),
                "budget_source": source, "rejudge": True}
    if step is None:
        rounds = rounds or DEFAULT_ROUNDS
        step = budget / rounds
    elif rounds is None:
        rounds = max(1, math.ceil(budget / step - 1e-9))
    return {"rounds": int(rounds), "step": float(step), "budget": float(budget), "budget_source": source}


def best_round(state: Summary) -> int:
    """The round with the best validation accuracy so far (0 = the input checkpoint); ties go to the earlier."""
    candidates = [(0, state.input_val_accuracy)] + [(r.round, r.val_accuracy) for r in state.rounds]
    return max(candidates, key=lambda item: (item[1], -item[0]))[0]


def collect_removed(out_dir: Path, rounds: list[RoundRecord]) -> None:
    """DIR/removed.csv: every removed row with the round that removed it and its rank then."""
    tables = []
    for record in rounds:
        round_dir = out_dir / record.folder
        removed = read_table(round_dir / "removed.csv")
        removed = rebase_paths(removed, round_dir, out_dir / "removed.csv")
        removed.insert(0, "round", record.round)
        tables.append(removed)
    if tables:
        write_table(pd.concat(tables, ignore_index=True), out_dir / "removed.csv")


def _round_inputs(out: Path, checkpoint: str, manifest: str, loop: LoopOptions, train_options: TrainOptions,
                  state: Summary) -> tuple[str, str, str | None]:
    """(the model, the manifest and the layer the next round ranks and refines on)."""
    previous = state.rounds[-1] if state.rounds else None
    # A probe refit from scratch on an unchanged backbone needs nothing from the previous round's model.
    from_input = loop.boundary == "refit" and train_options.scope == "refit"
    model = str(out / previous.folder / "model.safetensors") if previous and not from_input else str(checkpoint)
    # --rejudge: every input row is ranked again under the last round's model
    rows = str(out / previous.folder / "kept.csv") if previous and not loop.rejudge else str(manifest)
    # A refined network is a new one: --rejudge chooses its layer again each round
    layer = (state.layer or HEAD_INPUT) if state.layer is not ABSENT and not loop.rejudge else None
    return model, rows, layer


def _note_ranking(state: Summary, loop: LoopOptions, sidecar: dict, table, reporter: Reporter) -> None:
    """What the first ranking settles for the run: the method auto resolved to, the probe's layer, the plan."""
    if state.method is None:  # for the summary: what --method auto ranked by
        state.method = sidecar["method"]
    if loop.boundary == "refit" and state.layer is ABSENT:
        chosen = sidecar["parameters"]["layer"]
        state.layer = None if chosen == HEAD_INPUT else chosen
        state.layer_choice = {k: sidecar["parameters"].get(k) for k in ("layer", "layer_choice", "layers")}
    if state.plan is None:
        estimate = estimate_noise_share(table) if loop.budget is None and not (loop.step and loop.rounds) else None
        state.plan = plan_rounds(loop, estimate["share"] if estimate else None)
        if estimate:
            state.plan["estimate"] = estimate
            reporter.info(f"budget: remove {estimate['share']:.1%} in all, estimated as the {estimate['reason']}")
            warn_of_a_large_budget(estimate['share'], reporter)


def _round_training(loop: LoopOptions, train_options: TrainOptions, state: Summary) -> TrainOptions:
    """How the round's model is refined; a probe refit from the input is the scoring probe: same layer, same L2."""
    if loop.boundary == "refit" and train_options.scope == "refit" and state.layer not in (None, ABSENT):
        return replace(train_options, layer=state.layer, l2=DEFAULT_L2 if loop.probe_l2 is None else loop.probe_l2)
    return train_options


def run_round(number: int, out: Path, checkpoint: str, manifest: str, loop: LoopOptions, train_options: TrainOptions,
              val: str | None, model_options: ModelOptions, run: RunOptions, reporter: Reporter, state: Summary,
              original_rows: int) -> RoundRecord:
    """Round `number`, built in a hidden folder and renamed DIR/round-NN/ once complete; its record."""
    model, rows, layer = _round_inputs(out, checkpoint, manifest, loop, train_options, state)
    folder = f"round-{number:02d}"
    with all_or_none():
        if (out / folder).exists():  # renamed but not yet in summary.json when the last run stopped
            shutil.rmtree(out / folder)
    with building(out / f".{folder}.tmp") as here:
        started = time.perf_counter()
        ranking = score_round(loop, number, model, rows, here / "scores.csv", model_options, run, reporter, layer, val)
        _note_ranking(state, loop, ranking.sidecar, ranking.table, reporter)
        scored = time.perf_counter()
        pruned = prune_round(loop, here / "scores.csv", rows, here, removal_count(state.plan["step"], original_rows),
                             len(ranking.table))
        pruned_at = time.perf_counter()
        refined = refine(model, str(here / "kept.csv"), output=str(here / "model.safetensors"),
                         defaults=_round_training(loop, train_options, state), val=val, model_options=model_options,
                         run_options=run, reporter=reporter)
        record = RoundRecord(
            round=number, folder=folder, scored_rows=len(ranking.table), removed=pruned.summary["removed_rows"],
            kept=pruned.summary["kept_rows"], removed_total=original_rows - pruned.summary["kept_rows"],
            **ranked_by(ranking.sidecar), removed_per_class=pruned.summary["removed_per_class"],
            seconds={"score": scored - started, "prune": pruned_at - scored, "refine": time.perf_counter() - pruned_at},
            val_accuracy=max(r.get("val_accuracy", -1.0) for r in refined.history) if val else None)
        with all_or_none():
            here.rename(out / folder)
    return record


def _record_round(out: Path, loop: LoopOptions, val: str | None, state: Summary, record: RoundRecord) -> None:
    """Add the round to the record, decide whether the run is finished, and write summary.json and DIR/removed.csv
    together."""
    state.rounds.append(record)
    done_by_plan = record.round >= state.plan["rounds"]
    stopped_by_val = bool(val) and record.round - best_round(state) >= loop.patience
    if done_by_plan or stopped_by_val:
        state.finished = True
        state.stopped_because = ("validation accuracy stopped improving" if stopped_by_val and not done_by_plan
                                 else "all planned rounds done")
    with output_set(overwrite=True):  # the summary and DIR/removed.csv change together
        save_state(out, state)
        with all_or_none():
            if is_main():
                collect_removed(out, state.rounds[-1:] if loop.rejudge else state.rounds)


def _finish(out: Path, manifest: str, loop: LoopOptions, val: str | None, model_options: ModelOptions,
            run: RunOptions, reporter: Reporter, state: Summary, original_rows: int) -> None:
    """The best round (on --val; else the last) becomes DIR/final.safetensors; rejudge then judges every row."""
    best = max(state.rounds, key=lambda r: (r.val_accuracy, -r.round)) if val else state.rounds[-1]
    state.final_round = best.round
    with output_set(overwrite=True):  # the final model and the summary that names its round change together
        with all_or_none():
            with atomic_path(out / "final.safetensors") as tmp:  # every process, into its own folder: the judgement reads it
                shutil.copyfile(out / best.folder / "model.safetensors", tmp)
        save_state(out, state)
    if loop.rejudge and state.judgement is None:
        def finish(judgement: dict) -> None:
            state.judgement = {"round": state.final_round, **judgement}
            save_state(out, state)

        # it ranks as a further round would, the top budget of every row, as each round did
        judge(out, manifest, loop, len(state.rounds) + 1, state.plan["step"], original_rows, model_options, run,
              reporter, finish)
    if val and best.val_accuracy < state.input_val_accuracy:
        reporter.warn(f"no round beat the input checkpoint on --val ({state.input_val_accuracy:.4f}); "
                      f"final.safetensors is the best round ({best.val_accuracy:.4f})")


def run_rounds(checkpoint: str, manifest: str, out: Path, loop: LoopOptions, train_options: TrainOptions,
               val: str | None, model_options: ModelOptions, run: RunOptions, reporter: Reporter, state: Summary,
               original_rows: int, on_round: Callable[[dict], None] | None) -> Summary:
    """The rounds still to run (all of them, or those after a resumed run's last finished one), then the finish."""
    state.rounds = state.rounds or []
    share_rounds(out, state)
    # Each round reads the manifests irank wrote from the checked one, in round folders beside it.
    round_options = replace(model_options, allow_outside_root=True)
    if val and state.input_val_accuracy is None:
        state.input_val_accuracy = evaluate(checkpoint, val, model_options=model_options, run_options=run)["accuracy"]
    if state.rounds:
        reporter.info(f"resuming {out}: {len(state.rounds)} rounds already finished")
    with all_or_none():
        for leftover in out.glob(".round-*.tmp"):
            shutil.rmtree(leftover)
    while not state.finished:
        record = run_round(len(state.rounds) + 1, out, checkpoint, manifest, loop, train_options, val, round_options,
                           run, reporter, state, original_rows)
        _record_round(out, loop, val, state, record)
        if on_round:
            on_round(record.to_dict())
    _finish(out, manifest, loop, val, round_options, run, reporter, state, original_rows)
    return state
