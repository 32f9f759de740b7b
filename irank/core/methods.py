"""The names of irank's ranking methods, influence measures and curvatures, and which method `--method auto`
means on each boundary. Standard library only, so options and the command line's help import no torch.

`--method auto`: on the checkpoint's own head, auto is influence, the paper's score. On a refit probe it is the
joint loss (`irank.core.joint`): the probe's loss and the head's loss, their rankings averaged. Over the benchmark
suite's five bases (docs/benchmarks/suite.md) it was never below the head's own loss, with the best worst case
(AUROC 0.783, against 0.740 for the probe's loss alone, 0.689 for the head's loss) and the best mean (0.824
against 0.822 and 0.792). The probe's loss alone (`--method loss`) had replaced the probe's influence as auto
before (docs/benchmarks/method-auto.md: on ten CIFAR-10 checkpoints it ranked better on every cross-entropy one,
by 0.04 to 0.12 AUROC); a score with units, it is what `--fail-score` gates on.
"""

from __future__ import annotations

AUTO = {"head": "influence", "refit": "joint-loss"}


WHY = {
    "head": "auto: influence on the checkpoint's own head",
    "refit": "auto: the joint loss (the probe's loss and the head's loss, their ranks averaged), which held best over "
             "the benchmark suite's bases",
}


def resolve_method(method: str, boundary: str) -> tuple[str, str]:
    """(the method to rank by, why) for `method` on `boundary` ("head" or "refit")."""
    if method != "auto":
        return method, "given"
    return AUTO[boundary], WHY[boundary]


MEASURES = ("self-influence", "boundary-shift", "parameter-shift")


CURVATURES = ("auto", "exact", "kfac")


PROBE_MEASURES = ("loss", "margin", "self-influence", "boundary-shift")


REFIT_ONLY = ("joint-loss",)  # methods that need a refit probe beside the head
