"""irank: find mislabeled training samples by their influence on a trained classifier's decision boundary.

Every CLI command is a plain function here: `score`, `prune`, `refine`, `train`, `evaluate`, `review`,
`apply_review` (irank apply), `check_gate` (the CI gate of irank score --fail-over) and `post_train`.
Below them, an array-level API with no files: `label_issue_scores`, `rank`, `find_label_issues`, `score_model`.

The names are imported on first use, so `import irank` (and the `irank` command's start-up) costs no torch.
"""

from __future__ import annotations

import importlib

from irank._version import __version__

# public name → the module that defines it
_EXPORTS = {
    "IrankError": "irank.runtime.errors",
    "apply_review": "irank.stages.apply",
    "evaluate": "irank.stages.evaluate",
    "check_gate": "irank.stages.gate",
    "BoundaryOptions": "irank.options",
    "ModelOptions": "irank.options",
    "RunOptions": "irank.options",
    "LoopOptions": "irank.options",
    "post_train": "irank.workflows.post_train",
    "prune": "irank.stages.prune",
    "TrainOptions": "irank.options",
    "refine": "irank.stages.refine",
    "train": "irank.stages.refine",
    "review": "irank.stages.review",
    "score": "irank.stages.score",
    # the array-level API: arrays or an nn.Module and a Dataset in, scores and a selection out, no files
    "label_issue_scores": "irank.arrays",
    "find_label_issues": "irank.arrays",
    "rank": "irank.arrays",
    "score_model": "irank.arrays",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'irank' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

