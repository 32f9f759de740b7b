"""The names of irank's ranking methods, influence measures and curvatures, and which method `--method auto`
means on each boundary. Standard library only, so options and the command line's help import no torch.

`--method auto`: on the checkpoint's own head, auto is influence, the paper's score. On a refit probe it is the
probe's own loss: measured one-shot on ten CIFAR-10 checkpoints (docs/benchmarks/method-auto.md), the probe's
loss ranked the wrong labels better than its self-influence on every cross-entropy checkpoint, memorized or not
(by 0.04 to 0.12 AUROC), and at most 0.005 worse on the others. The influence's leverage factor φ̃ᵀB⁻¹φ̃ favours
atypical images over mislabeled ones there.
"""

from __future__ import annotations

AUTO = {"head": "influence", "refit": "loss"}


WHY = {
    "head": "auto: influence on the checkpoint's own head",
    "refit": "auto: the probe's loss, which ranked wrong labels better than the probe's influence on the benchmark",
}


def resolve_method(method: str, boundary: str) -> tuple[str, str]:
    """(the method to rank by, why) for `method` on `boundary` ("head" or "refit")."""
    if method != "auto":
        return method, "given"
    return AUTO[boundary], WHY[boundary]


MEASURES = ("self-influence", "boundary-shift", "parameter-shift")


CURVATURES = ("auto", "exact", "kfac")


PROBE_MEASURES = ("loss", "margin", "self-influence", "boundary-shift")
