"""irank: find mislabeled training samples by their influence on a trained classifier's decision boundary.

Every CLI command is a plain function here: `score`, `prune`, `refine`, `train`, `evaluate`.
"""

from ._version import __version__
from .errors import IrankError
from .evaluation import evaluate
from .loading import ModelOptions, RunOptions
from .prune import prune
from .refine import TrainOptions, refine, train
from .scoring import score

__all__ = [
    "__version__", "IrankError", "ModelOptions", "RunOptions", "TrainOptions",
    "evaluate", "prune", "refine", "score", "train",
]
