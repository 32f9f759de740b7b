"""Every option of irank and its one default, used alike by the command line and by Python.

A field left None means "not given": it takes its default where it acts, and a field given where it would do
nothing is refused (a flag is never silently ignored). The defaults are measured choices; where one comes
from a benchmark, its comment says which.

- `ModelOptions`: how to build the model and read the inputs, where the checkpoint does not say.
- `RunOptions`: where and how the model runs (device, batches, workers, memory, precision).
- `BoundaryOptions` and `resolve_ranking`: which decision boundary `score` ranks on, and by which method.
- `TrainOptions`: how `refine`, `train` and post-train's fine-tunes train (`REFINE`, `TRAIN`, `RECIPES`).
- `LoopOptions`: post-train's strategy, budget and rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from irank.core.methods import CURVATURES, MEASURES, PROBE_MEASURES, REFIT_ONLY, resolve_method
from irank.runtime.errors import UsageError
from irank.runtime.sizes import DEFAULT_MEMORY_BUDGET, parse_size

# --- the model and the run ---------------------------------------------------------------------------------


@dataclass
class ModelOptions:
    """How to build the model and read images, when the checkpoint's metadata does not say (or to override it)."""

    arch: str | None = None
    head: str | None = None
    classes: str | None = None  # a file, one class name per line
    preprocess: str | None = None  # preset name
    image_size: int | None = None
    resize: int | None = None
    mean: str | None = None
    std: str | None = None
    allow_outside_root: bool = False  # read images outside the manifest's folder (a manifest you trust)
    on_bad_image: str = "fail"  # fail: stop on the first unreadable image; skip: leave such rows out


@dataclass
class RunOptions:
    """Where and how the model runs; `irank.model.placement.placement_for` resolves the `auto`s for a model."""

    device: str = "auto"
    batch_size: int = 128
    num_workers: int | None = None  # None: auto (see irank.model.inputs.resolve_workers)
    # bytes of per-sample arrays (features, logits) `score` keeps in memory; past it, a temporary file.
    # None: no limit.
    memory_budget: int | None = parse_size(DEFAULT_MEMORY_BUDGET)
    channels_last: str = "auto"  # auto: on for models with wide 2-d convolutions (see irank.model.placement)
    precision: str = "auto"  # autocast: auto (bf16 on CUDA, full precision on CPU), fp32, bf16, fp16


# --- the boundary and the ranking --------------------------------------------------------------------------

BOUNDARIES = ("head", "refit")
HEAD_INPUT = "head-input"  # --layer value: the features that flow into the checkpoint's own head
DEFAULT_L2 = 0.1
CHOICE_ROWS = 4096  # the default sample for --layer auto's choice: its cost stays flat in n


@dataclass
class BoundaryOptions:
    """The default, measured on the benchmark: a probe refit at the layer `auto` picks.

    `l2` and `choice_rows` left None take their defaults (DEFAULT_L2, CHOICE_ROWS) where they apply; given
    where they do nothing (on the head; a layer given by name), `validate` refuses them.
    """

    kind: str = "refit"
    layer: str | None = "auto"  # with refit: a module name, "auto", or "head-input"; ignored by head when "auto"
    l2: float | None = None  # the probe's L2 strength on standardized features (refit)
    choice_rows: int | None = None  # --layer auto chooses on a seeded random sample of this many rows
    val: str | None = None  # a clean labelled manifest: --layer auto chooses by the probes' accuracy on it

    def validate(self) -> None:
        if self.kind not in BOUNDARIES:
            raise UsageError(f"--boundary {self.kind}: choose from {', '.join(BOUNDARIES)}")
        if self.l2 is not None and not self.l2 > 0:
            raise UsageError(f"--l2 {self.l2}: must be positive")
        if self.choice_rows is not None and self.choice_rows < 10:
            raise UsageError(f"--choice-rows {self.choice_rows}: must be at least 10")
        if self.kind == "head":
            for flag, value in (("--layer", None if self.layer == "auto" else self.layer), ("--l2", self.l2),
                                ("--choice-rows", self.choice_rows)):
                if value is not None:
                    raise UsageError(f"{flag} needs --boundary refit (the head boundary is the checkpoint's own head)")
        if self.choice_rows is not None and self.layer != "auto":
            raise UsageError(f"--choice-rows samples the rows that --layer auto chooses on; --layer {self.layer} "
                             "is given")
        if self.val is not None and (self.kind != "refit" or self.layer != "auto"):
            raise UsageError("--val chooses the layer of --boundary refit --layer auto; it has no use with "
                             f"--boundary {self.kind}" + (f" --layer {self.layer}" if self.kind == "refit" else ""))

    def resolved(self) -> "BoundaryOptions":
        """These options, validated, with the defaults filled in where left None."""
        self.validate()
        return replace(self, l2=DEFAULT_L2 if self.l2 is None else self.l2,
                       choice_rows=CHOICE_ROWS if self.choice_rows is None else self.choice_rows)

    @property
    def probe_layer(self) -> str:
        return self.layer or HEAD_INPUT


METHODS = ("auto", "influence", "loss", "margin", "gradnorm", "joint-loss")
DEFAULT_MEASURE = "self-influence"
DEFAULT_CURVATURE = "auto"
DEFAULT_DAMPING = 0.01


def validate_score_options(method: str, measure: str | None, curvature: str | None, damping: float | None) -> None:
    """The values are among the choices (None: not given)."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose from {', '.join(METHODS)}")
    if measure is not None and measure not in MEASURES:
        raise UsageError(f"--influence-measure {measure}: choose from {', '.join(MEASURES)}")
    if curvature is not None and curvature not in CURVATURES:
        raise UsageError(f"--curvature {curvature}: choose from {', '.join(CURVATURES)}")
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
                             "by the joint loss here)")
    if method in REFIT_ONLY and boundary != "refit":
        raise UsageError(f"--method {method} ranks by a refit probe's loss beside the head's: it needs --boundary "
                         "refit (on the head alone, use --method loss)")
    return resolve_method(method, boundary)


def units_needed(ranking: "Ranking") -> "Ranking":
    """The ranking a threshold on score values (--fail-score) can use: auto's joint loss is a share of rows, with
    no units, so there auto ranks by the probe's loss; a joint loss asked for by name is refused."""
    if ranking.method not in REFIT_ONLY:
        return ranking
    if ranking.how == "given":
        raise UsageError(f"--fail-score gates on score values; --method {ranking.method} scores are shares of rows "
                         "(no units): use --method loss, or --fail-over alone on --boundary head")
    return replace(ranking, method="loss", how="auto: the probe's loss (--fail-score needs a score with units; "
                                                "auto alone ranks by the joint loss here)")


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


# --- training ----------------------------------------------------------------------------------------------

SCOPES = ("head", "full", "refit")
LOSSES = ("ce", "gce")
AUGMENTS = ("none", "flip", "crop-flip", "auto")  # auto: see irank.model.inputs.resolve_augment
# what --scope refit (a convex refit of the head on frozen features) takes; the other scopes train by SGD
REFIT_FIELDS = ("scope", "l2", "layer", "momentum")
SGD_FIELDS = ("scope", "epochs", "lr", "weight_decay", "momentum", "augment", "seed", "loss")


@dataclass
class TrainOptions:
    """How a model is trained or fine-tuned. A field left None takes the command's default where it acts: `REFINE`
    for `refine`, `TRAIN` for `train`, the strategy's recipe (`RECIPES`) for post-train's fine-tunes."""

    scope: str | None = None  # head: the last linear layer; full: the whole network; refit: the head refit (convex)
    epochs: int | None = None
    lr: float | None = None  # peak learning rate of SGD with momentum (cosine decay)
    weight_decay: float | None = None
    momentum: float = 0.9
    augment: str | None = None
    seed: int | None = None
    l2: float | None = None  # scope refit: L2 strength on standardized features
    layer: str | None = None  # scope refit: refit on this layer's pooled output instead of the head's input
    loss: str | None = None  # ce, or gce: generalized cross-entropy (Zhang & Sabuncu 2018), robust to label noise

    def resolved(self, defaults: "TrainOptions") -> "TrainOptions":
        """These options with `defaults` filled in where left None, validated; a field given where it does
        nothing at the resolved scope is refused."""
        filled = replace(self, **{f.name: getattr(defaults, f.name) for f in fields(self)
                                  if getattr(self, f.name) is None})
        acting = REFIT_FIELDS if filled.scope == "refit" else SGD_FIELDS
        for item in fields(self):
            if item.name not in acting and item.name != "momentum" and getattr(self, item.name) is not None:
                flag = "--" + item.name.replace("_", "-")
                why = ("--scope refit refits the head from scratch as a convex L2 regression on frozen features "
                       "(--l2, --layer)" if filled.scope == "refit" else
                       f"it acts on --scope refit; --scope {filled.scope} trains by SGD (see --weight-decay)")
                raise UsageError(f"{flag} does nothing here: {why}")
        filled.validate()
        return filled

    def validate(self) -> None:
        if self.scope not in SCOPES:
            raise UsageError(f"--scope {self.scope}: choose from {', '.join(SCOPES)}")
        if self.augment not in AUGMENTS:
            raise UsageError(f"--augment {self.augment}: choose from {', '.join(AUGMENTS)}")
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be at least 1")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: must be positive")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay {self.weight_decay}: must be 0 or more")
        if self.loss not in LOSSES:
            raise UsageError(f"--loss {self.loss}: choose from {', '.join(LOSSES)}")
        if not self.l2 > 0:
            raise UsageError(f"--l2 {self.l2}: must be positive")
        if self.layer and self.scope != "refit":
            raise UsageError("--layer needs --scope refit (the probe is refit on that layer's features)")


# `irank refine`'s defaults: a short fine-tune of the head; `irank train`'s: the whole network from scratch
REFINE = TrainOptions(scope="head", epochs=5, lr=0.01, weight_decay=5e-4, augment="none", seed=0, l2=1e-3, loss="ce")
TRAIN = replace(REFINE, scope="full", epochs=20, lr=0.05)


# --- post-train --------------------------------------------------------------------------------------------

DEFAULT_ROUNDS = 5
DEFAULT_REJUDGE_ROUNDS = 3  # with --rejudge each round is a whole fine-tune; ce-sym40 gained little after 3
REJUDGE_BOUNDARIES = ("head", "same")
STRATEGIES = ("unlearn", "crossfit", "rejudge", "gradual")


@dataclass(frozen=True)
class Recipe:
    """A strategy's defaults: how it fine-tunes and on which boundary its first ranking is made."""

    training: TrainOptions
    boundary: str
    layer: str | None = None


# The benchmark behind each (docs/benchmarks): on ce-sym40 one 30-epoch GCE fine-tune of every row, ranked by
# its own head's loss, reached AUROC 0.950 / precision at k 0.852 and test accuracy 0.689; --rejudge's rounds
# 0.946 / 0.850 and 0.681; the gradual loop (head influence, refit head) 0.757 / 0.638 and 0.508.
UNLEARN = Recipe(replace(REFINE, scope="full", epochs=30, lr=0.1, augment="auto", loss="gce"), boundary="head")
RECIPES = {
    "unlearn": UNLEARN,
    "crossfit": UNLEARN,  # unlearn's fine-tune on each half, then on the rows kept (docs/benchmarks/posttrain-default.md)
    "rejudge": Recipe(replace(REFINE, scope="full", epochs=10, lr=0.1, augment="auto", loss="gce"), boundary="refit",
                      layer="auto"),
    "gradual": Recipe(replace(REFINE, scope="refit", epochs=2, lr=0.01), boundary="head"),
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
    patience: int | None = None  # with --val, gradual and rejudge: rounds without improvement before stopping (1)
    method: str = "auto"  # auto: influence on the head, the probe's loss on a refit probe (see method_choice)
    # influence settings (None: the default, where they act; see scoring.resolve_ranking)
    influence_measure: str | None = None
    curvature: str | None = None
    damping: float | None = None
    boundary: str | None = None  # head, or refit: an L2 probe refit each round at `layer`
    layer: str | None = None  # with boundary refit: a module name, "auto" (chosen in round 1), or the head's input
    probe_l2: float | None = None  # with boundary refit: the scoring probe's L2 (None: boundary.DEFAULT_L2)
    # unlearn, crossfit, rejudge or gradual (see post_train); None: gradual when rounds or step are given, else
    # unlearn.
    # A boundary left None is the strategy's (RECIPES), and so is its layer.
    strategy: str | None = None
    # With rejudge, the boundary of rounds 2 on: "head", the refined model's own head (trained without the last
    # round's suspects, so it could not bend around them), or "same" (`boundary` again, as in round 1)
    rejudge_boundary: str | None = None  # with rejudge (None: "head")

    @property
    def rejudge(self) -> bool:
        return self.strategy == "rejudge"

    @property
    def unlearn(self) -> bool:
        return self.strategy == "unlearn"

    @property
    def crossfit(self) -> bool:
        return self.strategy == "crossfit"

    @property
    def once(self) -> bool:
        """A strategy without rounds: unlearn or crossfit (fine-tunes, then one judgement of every row)."""
        return self.unlearn or self.crossfit

    def resolved(self, val: str | None = None) -> "LoopOptions":
        """These options with the strategy, and what was left out, filled in: a boundary and its layer from the
        strategy's recipe (RECIPES), `patience` 1, `rejudge_boundary` head. `val`: the --val manifest, without
        which --patience does nothing."""
        strategy = resolve_strategy(self.strategy, self.rounds, self.step)
        if strategy not in STRATEGIES:
            raise UsageError(f"--strategy {strategy}: choose from {', '.join(STRATEGIES)}")
        if self.rejudge_boundary is not None and strategy != "rejudge":
            raise UsageError("--rejudge-boundary applies with --rejudge only")
        if self.patience is not None and strategy in ("unlearn", "crossfit"):
            raise UsageError(f"--patience applies to --strategy gradual or rejudge; {strategy} has no rounds (with "
                             "--val its fine-tunes keep their best epoch)")
        if self.patience is not None and val is None:
            raise UsageError("--patience does nothing here: it counts rounds without a gain on --val")
        filled = replace(self, strategy=strategy, patience=1 if self.patience is None else self.patience,
                         rejudge_boundary=self.rejudge_boundary or "head")
        if self.boundary is not None:
            return filled
        recipe = RECIPES[strategy]
        return replace(filled, boundary=recipe.boundary, layer=self.layer or recipe.layer)

    def validate(self) -> None:
        if self.once:
            for name, value in (("--rounds", self.rounds), ("--step", self.step)):
                if value is not None:
                    raise UsageError(f"{name} applies to --strategy gradual or rejudge; --strategy {self.strategy} "
                                     "has no rounds")
        if self.crossfit and self.boundary != "head":
            raise UsageError("--boundary refit does not apply to --strategy crossfit: it ranks every row on the heads "
                             "of the two models fine-tuned on its halves")
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
                 + ("" if self.once else " (or --step with --rounds)"))
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
        return [1] if self.once else [1, 2]

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
        0.941 / 0.956 / 0.782 against 0.934 / 0.954 / 0.765), as on every head that did not memorize its labels.
        On a refit probe `auto` is the probe's loss, as measured for post-train's rounds (score's auto, the joint
        loss, was chosen on base checkpoints, not on the rounds' refined models)."""
        if self.method != "auto":
            return self.method
        return "loss" if self._on_refined_head(number) or self.boundary == "refit" else "auto"

    def _on_refined_head(self, number: int) -> bool:
        """Whether round `number` ranks on a refined model's own head: --rejudge's rounds 2 on, and unlearn's
        judgement (on --boundary head), and crossfit's."""
        if self.once:
            return self.boundary == "head"
        return self.rejudge and number > 1 and self.rejudge_boundary == "head"
