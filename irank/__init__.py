"""irank: find mislabeled training samples by their influence on a trained classifier's decision boundary.

Every CLI command is a plain function here: `score`, `prune`, `refine`, `train`, `evaluate`, `review`,
`apply_review` (irank apply), `check_gate` (the CI gate of irank score --fail-over) and `post_train`.
"""

from ._version import __version__
from .errors import IrankError
from .apply import apply_review
from .evaluation import evaluate
from .gate import check_gate
from .boundary import BoundaryOptions
from .loading import ModelOptions, RunOptions
from .posttrain import LoopOptions, post_train
from .prune import prune
from .refine import TrainOptions, refine, train
from .review import review
from .scoring import score

__all__ = [
    "__version__", "BoundaryOptions", "IrankError", "LoopOptions", "ModelOptions", "RunOptions", "TrainOptions",
    "apply_review", "check_gate", "evaluate", "post_train", "prune", "refine", "review", "score", "train",
]
