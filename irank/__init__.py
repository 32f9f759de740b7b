"""irank: find mislabeled training samples by their influence on a trained classifier's decision boundary.

Every CLI command is a plain function here: `score`, `prune`, `refine`, `train`, `evaluate`, `review`,
`apply_review` (irank apply), `check_gate` (the CI gate of irank score --fail-over) and `post_train`.

The names are imported on first use, so `import irank` (and the `irank` command's start-up) costs no torch.
"""

from __future__ import annotations

import importlib
import sys
import types

from ._version import __version__

# public name → the module that defines it
_EXPORTS = {
    "IrankError": ".errors",
    "apply_review": ".apply",
    "evaluate": ".evaluation",
    "check_gate": ".gate",
    "BoundaryOptions": ".boundary",
    "ModelOptions": ".loading",
    "RunOptions": ".loading",
    "LoopOptions": ".posttrain",
    "post_train": ".posttrain",
    "prune": ".prune",
    "TrainOptions": ".refine",
    "refine": ".refine",
    "train": ".refine",
    "review": ".review",
    "score": ".scoring",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'irank' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Face(types.ModuleType):
    """The package, whose public names win over its submodules of the same name (`irank.refine` is the function
    even once the module irank/refine.py is imported, as when the names were imported eagerly)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
