"""`irank post-train`: refine a model trained on noisy labels and rank its rows under the refined model.

Three strategies (see `post_train`): unlearn (the default: one noise-robust fine-tune on every row, then every
row ranked under the fine-tuned model), rejudge (rounds of rank all rows, remove the top budget, fine-tune on
the rest) and gradual (the paper's loop: score, remove the rows ranked first, refine, round by round).

Each round's files go to `DIR/round-NN/` (built in a hidden sibling folder and renamed when the round
is complete), and `DIR/summary.json` is rewritten after every round, so an interrupted run resumes
after its last finished round; unlearn's fine-tune saves its state after every epoch and resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from ._version import __version__
from .distributed import active, all_or_none, broadcast_object, is_main, local_outputs, writes_here
from .errors import UsageError
from .boundary import DEFAULT_L2, HEAD_INPUT, BoundaryOptions
from .estimate import estimate_noise_share
from .evaluation import evaluate
from .files import atomic_path, output_set, remove_path, sha256_file, write_json_atomic
from .loading import ModelOptions, RunOptions, check_same_input, prepare
from .manifest import check_inside_root, encode_labels, read_manifest, read_table, rebase_paths, write_table
from .progress import Reporter
from .prune import prune
from .refine import TrainOptions, refine
from .scoring import acting_flags, score, validate_score_options

DEFAULT_ROUNDS = 5
DEFAULT_REJUDGE_ROUNDS = 3  # with --rejudge each round is a whole fine-tune; ce-sym40 gained little after 3
REJUDGE_BOUNDARIES = ("head", "same")
STRATEGIES = ("unlearn", "rejudge", "gradual")


@dataclass(frozen=True)
class Recipe:
    """A strategy's defaults: how it fine-tunes and on which boundary its first ranking is made."""

    scope: str
    epochs: int
    lr: float
    augment: str
    loss: str
    boundary: str
    layer: str | None = None

    def train_options(self) -> TrainOptions:
        return TrainOptions(scope=self.scope, epochs=self.epochs, lr=self.lr, augment=self.augment, loss=self.loss)


# The benchmark behind each (README, Benchmark): on ce-sym40 one 30-epoch GCE fine-tune of every row, ranked by
# its own head's loss, reached AUROC 0.950 / precision at k 0.852 and test accuracy 0.689; --rejudge's rounds
# 0.946 / 0.850 and 0.681; the gradual loop (head influence, refit head) 0.757 / 0.638 and 0.508.
RECIPES = {
    "unlearn": Recipe(scope="full", epochs=30, lr=0.1, augment="auto", loss="gce", boundary="head"),
    "rejudge": Recipe(scope="full", epochs=10, lr=0.1, augment="auto", loss="gce", boundary="refit", layer="auto"),
    "gradual": Recipe(scope="refit", epochs=2, lr=0.01, augment="none", loss="ce", boundary="head"),
}


def resolve_strategy(strategy: str | None, rounds: int | None, step: float | None) -> str:
    """The strategy to run: the one given, else gradual when rounds or a step are (they describe its loop), else
    unlearn, which ranked best on the benchmark."""
    if strategy is not None:
        return strategy
    return "gradual" if rounds is not None or step is not None else "unlearn"


@dataclass
class LoopOptions:
    """How much to remove and how: the plan of the gradual loop."""

    rounds: int | None = None
    step: float | None = None  # share of the original size removed per round
    budget: float | None = None  # total share removed over all rounds
    per_class: bool = False
    min_per_class: int = 1
    patience: int = 1  # with --val: rounds without improvement before stopping
    method: str = "auto"  # auto: influence on the head, the probe's loss on a refit probe (see method_choice)
    # influence settings (None: the default, where they act; see scoring.resolve_ranking)
    influence_measure: str | None = None
    curvature: str | None = None
    damping: float | None = None
    boundary: str | None = None  # head, or refit: an L2 probe refit each round at `layer`
    layer: str | None = None  # with boundary refit: a module name, "auto" (chosen in round 1), or the head's input
    probe_l2: float | None = None  # with boundary refit: the scoring probe's L2 (None: boundary.DEFAULT_L2)
    # unlearn, rejudge or gradual (see post_train); None: gradual when rounds or step are given, else unlearn.
    # A boundary left None is the strategy's (RECIPES), and so is its layer.
    strategy: str | None = None
    # With rejudge, the boundary of rounds 2 on: "head", the refined model's own head (trained without the last
    # round's suspects, so it could not bend around them), or "same" (`boundary` again, as in round 1)
    rejudge_boundary: str = "head"

    @property
    def rejudge(self) -> bool:
        return self.strategy == "rejudge"

    @property
    def unlearn(self) -> bool:
        return self.strategy == "unlearn"

    def resolved(self) -> "LoopOptions":
        """These options with the strategy, and a boundary left out, filled in (see RECIPES)."""
        strategy = resolve_strategy(self.strategy, self.rounds, self.step)
        if strategy not in STRATEGIES:
            raise UsageError(f"--strategy {strategy}: choose from {', '.join(STRATEGIES)}")
        if self.boundary is not None:
            return replace(self, strategy=strategy)
        recipe = RECIPES[strategy]
        return replace(self, strategy=strategy, boundary=recipe.boundary, layer=self.layer or recipe.layer)

    def validate(self) -> None:
        if self.unlearn:
            for name, value in (("--rounds", self.rounds), ("--step", self.step)):
                if value is not None:
                    raise UsageError(f"{name} applies to --strategy gradual or rejudge; --strategy unlearn fine-tunes "
                                     "once on every row")
        for name, value in (("--step", self.step), ("--budget", self.budget)):
            if value is not None and not 0 < value < 1:
                raise UsageError(f"{name} {value}: must be between 0 and 1 (exclusive)")
        if self.rounds is not None and self.rounds < 1:
            raise UsageError(f"--rounds {self.rounds}: must be at least 1")
        if self.rounds and self.step and self.budget and not math.isclose(self.rounds * self.step, self.budget, rel_tol=1e-6):
            raise UsageError("--rounds × --step must equal --budget; give two of the three")
        if self.patience < 1:
            raise UsageError(f"--patience {self.patience}: must be at least 1")
        if self.rejudge and self.step is not None:
            raise UsageError("--rejudge removes the whole --budget in every round; --step does not apply")
        if self.rejudge_boundary not in REJUDGE_BOUNDARIES:
            raise UsageError(f"--rejudge-boundary {self.rejudge_boundary}: choose from {', '.join(REJUDGE_BOUNDARIES)}")
        validate_score_options(self.method, self.influence_measure, self.curvature, self.damping)
        self.boundary_options().validate()
        self._check_flags_act()
        if self.boundary == "refit" and self.budget is None and not (self.step and self.rounds):
            raise UsageError(
                ("--rejudge needs --budget, the share to remove in each round (on --boundary head, its budget can be "
                 "estimated instead)" if self.rejudge else "--boundary refit needs --budget"
                 + ("" if self.unlearn else " (or --step with --rounds)"))
                + ": the budget estimate reads where the "
                "model disagrees with the labels, and a refit probe disagrees with many clean labels (27% of "
                "clean CIFAR-10, where post-train then cost 12 points of test accuracy)"
            )

    def boundary_options(self, layer: str | None = None, val: str | None = None) -> BoundaryOptions:
        """Scoring boundary of a round: `layer` once round 1 has fixed it. With `val`, round 1's `--layer auto`
        chooses by the probes' accuracy on it."""
        layer = layer or self.layer or (HEAD_INPUT if self.boundary == "refit" else None)
        return BoundaryOptions(kind=self.boundary, layer=layer, l2=self.probe_l2 if self.boundary == "refit" else None,
                               val=val if self.boundary == "refit" and layer == "auto" else None)

    def round_boundary(self, number: int, layer: str | None = None, val: str | None = None) -> BoundaryOptions:
        """Scoring boundary of round `number`. With rejudge (and `rejudge_boundary` head) rounds 2 on score on the
        refined model's own head: measured on ce-sym40 it ranked better than a probe refit on the same model."""
        if self._on_refined_head(number):
            return BoundaryOptions(kind="head", layer=None)
        return self.boundary_options(layer, val)

    def _ranked_rounds(self) -> list[int]:
        """Round numbers whose rankings stand for all: unlearn ranks once; rejudge's rounds 2 on (and its judgement)
        may rank otherwise than round 1; gradual's rounds all rank alike."""
        return [1] if self.unlearn else [1, 2]

    def round_flags(self, number: int) -> dict:
        """The influence settings given that act on round `number`'s ranking, as `score`'s keywords."""
        return acting_flags(self.round_method(number), self.round_boundary(number).kind,
                            measure=self.influence_measure, curvature=self.curvature, damping=self.damping)

    def _check_flags_act(self) -> None:
        """A flag that acts on no round's ranking is refused, not silently ignored."""
        acting = set().union(*(self.round_flags(number) for number in self._ranked_rounds()))
        given = {"influence_measure": self.influence_measure, "curvature": self.curvature, "damping": self.damping}
        for key, value in given.items():
            if value is not None and key not in acting:
                flag = "--" + key.replace("_", "-")
                rankings = ", ".join(sorted({f"the {self.round_method(n)} on --boundary {self.round_boundary(n).kind}"
                                             for n in self._ranked_rounds()}))
                raise UsageError(f"{flag} acts on influence (curvature and damping on the head only); this post-train "
                                 f"ranks by {rankings}")
        if self.probe_l2 is not None and all(self.round_boundary(n).kind != "refit" for n in self._ranked_rounds()):
            raise UsageError("--probe-l2 is the L2 of a refit probe; this post-train ranks on the head "
                             "(pass --boundary refit to rank on a probe)")

    def round_method(self, number: int) -> str:
        """The method of round `number`. On a refined model's own head `auto` is its loss: measured on the round-3
        models of ce-sym40, ce-sym20 and ce-asym40 the loss ranked better than the head's self-influence (AUROC
        0.941 / 0.956 / 0.782 against 0.934 / 0.954 / 0.765), as on every head that did not memorize its labels."""
        return "loss" if self.method == "auto" and self._on_refined_head(number) else self.method

    def _on_refined_head(self, number: int) -> bool:
        """Whether round `number` ranks on a refined model's own head: --rejudge's rounds 2 on, and unlearn's
        judgement (on --boundary head)."""
        if self.unlearn:
            return self.boundary == "head"
        return self.rejudge and number > 1 and self.rejudge_boundary == "head"


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


@dataclass
class PostTrainResult:
    summary: dict = field(default_factory=dict)
    final_model: str = ""


def _removal_count(step: float, original_rows: int) -> int:
    return max(1, int(round(step * original_rows)))




OWN_FILES = ("summary.json", "final.safetensors", "removed.csv", "scores.csv", "scores.csv.json", "kept.csv",
             "kept.csv.json",  # these four: the final judgement of --rejudge and unlearn
             "final.safetensors.resume")  # unlearn's fine-tune, after each epoch


def _own_entries(out_dir: Path) -> list[Path]:
    """What a post-train run writes into its folder: its summary, final model, removed.csv and round folders."""
    entries = [out_dir / name for name in OWN_FILES if (out_dir / name).exists()]
    return entries + sorted(out_dir.glob("round-[0-9][0-9]*")) + sorted(out_dir.glob(".round-*.tmp"))


def _started(out_dir: Path) -> bool:
    """Whether a run in `out_dir` has work to resume: a finished round, or an epoch of unlearn's fine-tune."""
    try:
        state = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        state = {}
    finished = isinstance(state, dict) and (state.get("rounds") or "unlearned" in state)
    return bool(finished) or (out_dir / "final.safetensors.resume").exists()


@contextlib.contextmanager
def _undone_unless_started(out_dir: Path) -> Iterator[None]:
    """A run that fails before it has anything to resume leaves nothing behind: the --out-dir it created is
    removed, and in a folder that was there before, the files it wrote (a summary.json that would refuse the
    corrected command as 'a run with other inputs')."""
    existed = out_dir.exists()
    before = set(out_dir.iterdir()) if existed and out_dir.is_dir() else set()
    try:
        yield
    except BaseException as error:
        if out_dir.is_dir() and _started(out_dir):
            if isinstance(error, KeyboardInterrupt):  # what the CLI's one line says
                error.irank_note = f"--out-dir {out_dir} keeps what finished: run the same command again to resume"
            raise
        if out_dir.is_dir() and not existed:
            shutil.rmtree(out_dir, ignore_errors=True)
        elif out_dir.is_dir():
            for entry in set(out_dir.iterdir()) - before:
                remove_path(entry)
        raise


def _clear_run(out_dir: Path) -> None:
    for entry in _own_entries(out_dir):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def _round_folder(building: Path) -> Iterator[Path]:
    """A round is built in a hidden folder; on any failure (Ctrl-C included) it is removed, so no half round remains."""
    building.mkdir()
    try:
        yield building
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def _check_inputs_outside_run(out_dir: Path, inputs: dict[str, str | None]) -> None:
    """Refuse an input that is one of the run's own files (e.g. an earlier final.safetensors), which a run replaces."""
    owned = [os.path.realpath(entry) for entry in _own_entries(out_dir)]
    for name, path in inputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if any(real == entry or real.startswith(entry + os.sep) for entry in owned):
            raise UsageError(f"the {name} {path} is one of the files post-train writes in --out-dir {out_dir}; "
                             "copy it elsewhere first or use another --out-dir")


def _load_state(out_dir: Path, config: dict, overwrite: bool) -> dict | None:
    """The state of an earlier run of the same command in `out_dir` (to resume), or None to start afresh.

    A run with other inputs or parameters, or post-train files without a summary, is replaced only
    with `overwrite`; `overwrite` always starts afresh.
    """
    summary_path = out_dir / "summary.json"
    if overwrite:
        _clear_run(out_dir)
        return None
    if not summary_path.exists():
        # Round folders without a summary are a first round cut short after its rename: rebuilt below.
        leftovers = [out_dir / name for name in OWN_FILES if (out_dir / name).exists()]
        if leftovers:
            raise UsageError(f"--out-dir {out_dir}: holds {leftovers[0].name} but no summary.json to resume from; "
                             "pass --overwrite to replace it, or use another --out-dir")
        return None
    try:
        state = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"--out-dir {out_dir}: cannot read summary.json ({exc}); pass --overwrite to start afresh") from None
    if not isinstance(state, dict) or state.get("config") != config:
        raise UsageError(
            f"--out-dir {out_dir} holds a post-train run with other inputs or parameters; "
            "repeat the original command to resume, use another --out-dir, or pass --overwrite to start afresh"
        )
    return state


def _best_round(state: dict) -> int:
    """The round with the best validation accuracy so far (0 = the input checkpoint); ties go to the earlier."""
    candidates = [(0, state["input_val_accuracy"])] + [(r["round"], r["val_accuracy"]) for r in state["rounds"]]
    return max(candidates, key=lambda item: (item[1], -item[0]))[0]


def _collect_removed(out_dir: Path, rounds: list[dict]) -> None:
    """DIR/removed.csv: every removed row with the round that removed it and its rank then."""
    tables = []
    for record in rounds:
        round_dir = out_dir / record["folder"]
        removed = read_table(round_dir / "removed.csv")
        removed = rebase_paths(removed, round_dir, out_dir / "removed.csv")
        removed.insert(0, "round", record["round"])
        tables.append(removed)
    if tables:
        write_table(pd.concat(tables, ignore_index=True), out_dir / "removed.csv")


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

    gradual, the paper's loop: round r scores the samples kept so far under the model of round r−1, removes the top `step` share
    (of the original size), and refines on the rest. With `val`, the loop stops once validation
    accuracy has not improved for `patience` rounds, and the best round becomes `final.safetensors`;
    without it, the last round does. Without a budget, the share to remove is estimated from the
    first round's scores (see irank.estimate).

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
        loop = (loop or LoopOptions()).resolved()
        train_options = train_options or RECIPES[loop.strategy].train_options()
        loop.validate()
        train_options.validate()
        if loop.rejudge and loop.boundary == "refit" and train_options.scope == "refit":
            raise UsageError("--rejudge with --boundary refit needs --scope full or head: a probe refit on the input's "
                             "unchanged features would rank every row the same in every round")
    if writes_here():
        with _undone_unless_started(Path(out_dir)):
            return _post_train(checkpoint, manifest, Path(out_dir), loop, train_options, val,
                               model_options or ModelOptions(), run_options or RunOptions(), reporter or Reporter(),
                               on_round, overwrite)
    with tempfile.TemporaryDirectory(prefix="irank-post-train-") as private, local_outputs():
        result = _post_train(checkpoint, manifest, Path(private), loop, train_options, val, model_options or ModelOptions(),
                             run_options or RunOptions(), reporter or Reporter(), on_round, overwrite)
    return replace(result, final_model=str(Path(out_dir) / "final.safetensors"))


def _share_rounds(out: Path, state: dict) -> None:
    """Under torchrun, when resuming: rank 0's last finished round (kept manifest and model) into every
    other process's private folder, where the next round reads them; and once the rounds are done, the
    final round's too (--val may have chosen an earlier one), which --rejudge's judgement reads."""
    if not active() or not state["rounds"]:
        return
    folders = {state["rounds"][-1]["folder"]}
    if "final_round" in state:
        folders |= {r["folder"] for r in state["rounds"] if r["round"] == state["final_round"]}
    for folder in sorted(folders):
        _share_round(out, folder)


def _share_round(out: Path, folder: str) -> None:
    payload = None
    with all_or_none():  # no collective inside: a process that fails here must reach the agreement
        if is_main():
            payload = (str((out / folder).resolve()), read_table(out / folder / "kept.csv"))
    source, kept = broadcast_object(payload)
    with all_or_none():
        if not is_main():
            (out / folder).mkdir(parents=True, exist_ok=True)
            write_table(rebase_paths(kept, Path(source), out / folder / "kept.csv"), out / folder / "kept.csv")
    _share_file(out, f"{folder}/model.safetensors")


def _score_round(loop: LoopOptions, number: int, model: str, manifest: str, output: Path, model_options: ModelOptions,
                 run: RunOptions, reporter: Reporter, layer: str | None = None, val: str | None = None,
                 overwrite: bool = False):
    """Round `number`'s ranking of `manifest` under `model`, on that round's boundary and method, into `output`."""
    return score(model, manifest, output=str(output), method=loop.round_method(number), **loop.round_flags(number),
                 boundary=loop.round_boundary(number, layer, val), model_options=model_options, run_options=run,
                 reporter=reporter, overwrite=overwrite)


def _prune_round(loop: LoopOptions, scores: Path, manifest: str, folder: Path, count: int, scored_rows: int):
    """Remove `count` of the `scored_rows` rows ranked first in `scores` from `manifest`: kept.csv and removed.csv in
    `folder` (under torchrun every process prunes its own copy of the same table alike)."""
    removal = {"count": count} if not loop.per_class else {"fraction": min(0.99, count / scored_rows)}
    with all_or_none():
        return prune(str(scores), manifest, output=str(folder / "kept.csv"), removed_output=str(folder / "removed.csv"),
                     per_class=loop.per_class, min_per_class=loop.min_per_class, overwrite=True, **removal)


def _ranked_by(sidecar: dict) -> dict:
    """What a round's scores table ranked by, for its record: boundary, layer (on a refit probe) and method."""
    parameters = sidecar["parameters"]
    layer = {"layer": parameters["layer"]} if parameters["boundary"] == "refit" else {}
    return {"boundary": parameters["boundary"], **layer, "method": sidecar["method"]}


JUDGEMENT_FILES = ("scores.csv", "scores.csv.json", "kept.csv", "kept.csv.json", "removed.csv")


def _judge(out: Path, manifest: str, loop: LoopOptions, number: int, budget: float | None, original_rows: int,
           model_options: ModelOptions, run: RunOptions, reporter: Reporter,
           publish_with: Callable[[dict], None]) -> dict:
    """The answer of --rejudge and unlearn: every input row ranked under final.safetensors, on the boundary a round
    `number` would use, and the top `budget` of them removed (without one, the share estimated from this ranking:
    the rows whose label the final model disagrees with): DIR/scores.csv, DIR/kept.csv and DIR/removed.csv. Under
    --rejudge the final model is the best (on ce-sym40 its ranking beat the last round's, made under the model
    before it). `publish_with(judgement)` writes what goes out with the judgement's files (summary.json), as one set."""
    started = time.perf_counter()
    # built beside DIR, at its depth (relative paths stay valid), then published with summary.json as one set
    building = out.parent / f".{out.name}.judgement.tmp"
    remove_path(building)
    with _round_folder(building):
        table = _score_round(loop, number, str(out / "final.safetensors"), manifest, building / "scores.csv",
                             model_options, run, reporter, overwrite=True)
        estimate = None
        if budget is None:
            estimate = estimate_noise_share(table.table)
            budget = estimate["share"]
            reporter.info(f"budget: remove {budget:.1%}, estimated as the {estimate['reason']} (the fine-tuned model's)")
        pruned = _prune_round(loop, building / "scores.csv", manifest, building, _removal_count(budget, original_rows),
                              len(table.table))
        reporter.info(f"final judgement under final.safetensors: removed {pruned.summary['removed_rows']}, "
                      f"kept {pruned.summary['kept_rows']}")
        judgement = {"model": "final.safetensors", **_ranked_by(table.sidecar), "budget": budget,
                     **({"estimate": estimate} if estimate else {}),
                     "removed": pruned.summary["removed_rows"], "kept": pruned.summary["kept_rows"],
                     "removed_per_class": pruned.summary["removed_per_class"], "seconds": time.perf_counter() - started}
        with output_set(overwrite=True) as outputs:
            for name in JUDGEMENT_FILES:
                outputs.add(building / name, out / name)
            publish_with(judgement)
    shutil.rmtree(building, ignore_errors=True)
    return judgement


def _run_config(checkpoint: str, manifest: str, val: str | None, loop: LoopOptions, train_options: TrainOptions,
                model_options: ModelOptions) -> dict:
    """What a run in --out-dir was made from: a later run resumes it only when this is the same."""
    return {
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "manifest": {"path": str(manifest), "sha256": sha256_file(manifest)},
        "val": {"path": str(val), "sha256": sha256_file(val)} if val else None,
        "loop": asdict(loop),
        "train": asdict(train_options),
        "model": asdict(model_options),
    }


def _start(out: Path, checkpoint: str, manifest: str, val: str | None, config: dict, model_options: ModelOptions,
           overwrite: bool) -> tuple[dict, int]:
    """The run's state (an earlier run's to resume, or a fresh one; under torchrun rank 0's for every process) and
    the number of input rows, once the inputs are checked."""
    with all_or_none():
        _check_inputs_outside_run(out, {"checkpoint": checkpoint, "manifest": manifest, "--val": val,
                                        "--classes file": model_options.classes})
        original = _check_inputs(checkpoint, manifest, val, model_options)
        out.mkdir(parents=True, exist_ok=True)
        state = _load_state(out, config, overwrite) or {"irank_version": __version__, "config": config}
    return broadcast_object(state), len(original)


def _check_inputs(checkpoint: str, manifest: str, val: str | None, model_options: ModelOptions):
    """Everything about the inputs that can be checked before --out-dir is touched: the manifests read, the
    checkpoint builds and fits them, --val holds the same kind of rows. A run refused here leaves no trace."""
    prepared = prepare(checkpoint, manifest, model_options)
    if val:
        held_out = read_manifest(val)
        if not model_options.allow_outside_root:
            check_inside_root(held_out)
        check_same_input(prepared.input_shape, held_out, "--val")
        encode_labels(held_out, prepared.classes)
    return prepared.manifest


def _save_state(out: Path, state: dict) -> None:
    with all_or_none():
        if is_main():  # a private folder of another torchrun process needs no summary
            write_json_atomic(out / "summary.json", state)


def _unlearn(checkpoint: str, manifest: str, out: Path, loop: LoopOptions, train_options: TrainOptions,
             val: str | None, model_options: ModelOptions, run: RunOptions, reporter: Reporter, state: dict,
             original_rows: int) -> PostTrainResult:
    """Strategy unlearn (see post_train): one fine-tune on every row into DIR/final.safetensors, then the judgement.
    The fine-tune saves its state after every epoch (DIR/final.safetensors.resume; not under torchrun), so the
    same command run again continues it."""
    final = out / "final.safetensors"
    if val and "input_val_accuracy" not in state:
        state["input_val_accuracy"] = evaluate(checkpoint, val, model_options=model_options, run_options=run)["accuracy"]
    if "unlearned" not in state:
        _save_state(out, state)  # before the fine-tune: a run stopped in it resumes from its last epoch
        started = time.perf_counter()
        reporter.info(f"unlearning: fine-tuning {train_options.scope} for {train_options.epochs} epochs on all "
                      f"{original_rows} rows ({train_options.loss} loss, learning rate {train_options.lr}, "
                      f"augment {train_options.augment})")
        refined = refine(checkpoint, manifest, output=str(final), train_options=train_options, val=val,
                         model_options=model_options, run_options=run, reporter=reporter, overwrite=True,
                         resume="auto" if not active() else False)
        state["unlearned"] = {"model": "final.safetensors", "epochs": train_options.epochs,
                              "best_epoch": refined.best_epoch, "seconds": time.perf_counter() - started}
        if val:
            state["unlearned"]["val_accuracy"] = max(r["val_accuracy"] for r in refined.history)
        _save_state(out, state)
    elif active():
        _share_file(out, "final.safetensors")
    if "judgement" not in state:
        def finish(judgement: dict) -> None:
            state["judgement"] = judgement
            state["plan"] = {"budget": judgement["budget"],
                             "budget_source": "--budget" if loop.budget is not None else "estimated"}
            state["finished"] = True
            _save_state(out, state)

        _judge(out, manifest, loop, 1, loop.budget, original_rows, replace(model_options, allow_outside_root=True),
               run, reporter, finish)
    if val and state["unlearned"]["val_accuracy"] < state["input_val_accuracy"]:
        reporter.warn(f"the fine-tuned model ({state['unlearned']['val_accuracy']:.4f} on --val) did not beat the "
                      f"input checkpoint ({state['input_val_accuracy']:.4f}); final.safetensors is its best epoch")
    return PostTrainResult(summary=state, final_model=str(final))


def _share_file(out: Path, name: str) -> None:
    """Under torchrun, when resuming: rank 0's `out/name` into every other process's private folder (whose
    folders for it exist)."""
    payload = None
    with all_or_none():
        if is_main():
            payload = (out / name).read_bytes()
    data = broadcast_object(payload)
    with all_or_none():
        if not is_main():
            with atomic_path(out / name) as tmp:
                Path(tmp).write_bytes(data)


def _post_train(checkpoint: str, manifest: str, out: Path, loop: LoopOptions, train_options: TrainOptions,
                val: str | None, model_options: ModelOptions, run: RunOptions, reporter: Reporter,
                on_round: Callable[[dict], None] | None, overwrite: bool) -> PostTrainResult:
    state, original_rows = _start(out, checkpoint, manifest, val,
                                  _run_config(checkpoint, manifest, val, loop, train_options, model_options),
                                  model_options, overwrite)
    state["strategy"] = loop.strategy
    if loop.unlearn:
        return _unlearn(checkpoint, manifest, out, loop, train_options, val, model_options, run, reporter, state,
                        original_rows)
    state.setdefault("rounds", [])
    state.setdefault("plan", None)
    _share_rounds(out, state)
    # Each round reads the manifests irank wrote from the checked one, in round folders beside it.
    round_options = replace(model_options, allow_outside_root=True)
    eval_kwargs = {"model_options": model_options, "run_options": run}
    if val and "input_val_accuracy" not in state:
        state["input_val_accuracy"] = evaluate(checkpoint, val, **eval_kwargs)["accuracy"]
    if state["rounds"]:
        reporter.info(f"resuming {out}: {len(state['rounds'])} rounds already finished")
    with all_or_none():
        for leftover in out.glob(".round-*.tmp"):
            shutil.rmtree(leftover)
    while not state.get("finished"):
        number = len(state["rounds"]) + 1
        previous = state["rounds"][-1] if state["rounds"] else None
        # A probe refit from scratch on an unchanged backbone needs nothing from the previous round's model.
        from_input = loop.boundary == "refit" and train_options.scope == "refit"
        current_model = str(out / previous["folder"] / "model.safetensors") if previous and not from_input else str(checkpoint)
        # --rejudge: every input row is ranked again under the last round's model
        current_manifest = str(out / previous["folder"] / "kept.csv") if previous and not loop.rejudge else str(manifest)
        # A refined network is a new one: --rejudge chooses its layer again each round
        layer = (state["layer"] or HEAD_INPUT) if "layer" in state and not loop.rejudge else None
        folder = f"round-{number:02d}"
        building = out / f".{folder}.tmp"
        with all_or_none():
            if (out / folder).exists():  # renamed but not yet in summary.json when the last run stopped
                shutil.rmtree(out / folder)
        with _round_folder(building):
            started = time.perf_counter()
            table = _score_round(loop, number, current_model, current_manifest, building / "scores.csv", round_options,
                                 run, reporter, layer, val)
            state.setdefault("method", table.sidecar["method"])  # for the summary: what --method auto ranked by
            if loop.boundary == "refit" and "layer" not in state:
                chosen = table.sidecar["parameters"]["layer"]
                state["layer"] = None if chosen == HEAD_INPUT else chosen
                state["layer_choice"] = {k: table.sidecar["parameters"].get(k) for k in ("layer", "layer_choice", "layers")}
            ranked_by = _ranked_by(table.sidecar)
            table = table.table
            scored = time.perf_counter()
            if state["plan"] is None:
                estimate = estimate_noise_share(table) if loop.budget is None and not (loop.step and loop.rounds) else None
                state["plan"] = plan_rounds(loop, estimate["share"] if estimate else None)
                if estimate:
                    state["plan"]["estimate"] = estimate
                    reporter.info(f"budget: remove {estimate['share']:.1%} in all, estimated as the {estimate['reason']}")
            plan = state["plan"]
            count = _removal_count(plan["step"], original_rows)
            pruned = _prune_round(loop, building / "scores.csv", current_manifest, building, count, len(table))
            pruned_at = time.perf_counter()
            round_training = train_options
            if from_input and state.get("layer"):
                # The round's model is the scoring probe refit on what is kept: same layer, same L2.
                round_training = replace(train_options, layer=state["layer"],
                                         l2=DEFAULT_L2 if loop.probe_l2 is None else loop.probe_l2)
            refined = refine(current_model, str(building / "kept.csv"), output=str(building / "model.safetensors"),
                             train_options=round_training, val=val, model_options=round_options, run_options=run,
                             reporter=reporter)
            finished_at = time.perf_counter()
            record = {
                "round": number,
                "folder": folder,
                "scored_rows": len(table),
                "removed": pruned.summary["removed_rows"],
                "kept": pruned.summary["kept_rows"],
                "removed_total": original_rows - pruned.summary["kept_rows"],
                **ranked_by,
                "removed_per_class": pruned.summary["removed_per_class"],
                "seconds": {"score": scored - started, "prune": pruned_at - scored, "refine": finished_at - pruned_at},
            }
            if val:
                record["val_accuracy"] = max(r.get("val_accuracy", -1.0) for r in refined.history)
            with all_or_none():
                building.rename(out / folder)
        state["rounds"].append(record)
        done_by_plan = number >= plan["rounds"]
        stopped_by_val = bool(val) and number - _best_round(state) >= loop.patience
        if done_by_plan or stopped_by_val:
            state["finished"] = True
            state["stopped_because"] = "validation accuracy stopped improving" if stopped_by_val and not done_by_plan else "all planned rounds done"
        with output_set(overwrite=True):  # the summary and DIR/removed.csv change together
            _save_state(out, state)
            with all_or_none():
                if is_main():
                    _collect_removed(out, state["rounds"][-1:] if loop.rejudge else state["rounds"])
        if on_round:
            on_round(record)
    if val:
        best = max(state["rounds"], key=lambda r: (r["val_accuracy"], -r["round"]))
    else:
        best = state["rounds"][-1]
    state["final_round"] = best["round"]
    final = out / "final.safetensors"
    with output_set(overwrite=True):  # the final model and the summary that names its round change together
        with all_or_none():
            with atomic_path(final) as tmp:  # every process, into its own folder: the judgement reads it
                shutil.copyfile(out / best["folder"] / "model.safetensors", tmp)
        _save_state(out, state)
    if loop.rejudge and "judgement" not in state:
        def finish(judgement: dict) -> None:
            state["judgement"] = {"round": state["final_round"], **judgement}
            _save_state(out, state)

        # it ranks as a further round would, the top budget of every row, as each round did
        _judge(out, manifest, loop, len(state["rounds"]) + 1, state["plan"]["step"], original_rows, round_options,
               run, reporter, finish)
    if val and best["val_accuracy"] < state["input_val_accuracy"]:
        reporter.warn(f"no round beat the input checkpoint on --val ({state['input_val_accuracy']:.4f}); "
                      f"final.safetensors is the best round ({best['val_accuracy']:.4f})")
    return PostTrainResult(summary=state, final_model=str(final))
