"""The array-level API: scores and a selection from what you already have in memory, with no files.

    import irank
    scores = irank.label_issue_scores(labels, features=embeddings)   # an L2 probe refit on them: its loss
    scores = irank.label_issue_scores(labels, features=embeddings, logits=logits)  # the joint loss (irank's default)
    scores = irank.label_issue_scores(labels, logits=logits, head_inputs=penultimate)  # the head's influence
    issues = irank.find_label_issues(scores, labels, fraction=0.1)   # a boolean mask: the top 10% by rank
    scores = irank.score_model(model, dataset)                        # an nn.Module and a Dataset of (x, y)

Higher scores are more suspect. These run the same math as `irank score` (the file-level stage runs it on a
manifest's rows, a block at a time, over processes and past a memory budget): on the same features and labels
they give the same scores. Which to use:

- `features=`: embeddings or a layer's activations you already have. A probe that cannot bend around memorized
  labels ranks wrong labels far better than a memorizing network's own head (docs, "How it works").
- `features=` and `logits=`: irank's default, the joint loss: the probe's loss and the head's, their ranks
  averaged (`irank.core.joint`); it held on every base of the benchmark suite, where each loss alone failed on some.
- `logits=` (and `head_inputs=`): the checkpoint's own head, the paper's score: influence needs the head's inputs;
  with logits alone the score is the loss.
- `score_model`: a model and a dataset; it reads the layer `--layer auto` would choose (or the one you name) and
  scores there, as `irank score` does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from irank.core.head_scores import method_scores
from irank.core.layer_choice import choose_layer
from irank.core.probe import refit_scores
from irank.core.ranking import class_ranks_in_order, rank_order
from irank.core.selection import removal_mask
from irank.model.forward import forward_pass
from irank.model.layers import block_candidates, layer_features
from irank.options import HEAD_INPUT, BoundaryOptions, resolve_ranking


def _labels(labels) -> torch.Tensor:
    values = torch.tensor(np.asarray(labels))
    if values.ndim != 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
        raise ValueError("labels: a 1-d array of class indices (0 .. C-1)")
    return values.long()


def _floats(name: str, values, rows: int) -> torch.Tensor:
    tensor = torch.tensor(np.asarray(values, dtype=np.float32))
    if tensor.ndim != 2 or len(tensor) != rows:
        raise ValueError(f"{name}: a 2-d array with one row per label ({rows}), got shape {tuple(tensor.shape)}")
    return tensor


def label_issue_scores(labels, *, features=None, logits=None, head_inputs=None, method: str = "auto",
                       measure: str | None = None, l2: float | None = None, num_classes: int | None = None) -> np.ndarray:
    """A score per sample, higher = more likely mislabeled (float64, in the order given).

    Give `features` (n × D) to refit an L2 probe on them (`l2`, default 0.1, on standardized features): `method`
    auto ranks by the probe's loss, `influence` by its influence (`measure` self-influence or boundary-shift),
    `margin`, `gradnorm`. Give `logits` (n × C) of the checkpoint's own head beside them for the joint loss (auto,
    or `joint-loss`): the probe's loss and the head's, their ranks averaged, a share in (0, 1]. Or give `logits`
    alone: the head's own scores, auto is influence when `head_inputs` (n × D, what flows into the head) are
    given, the loss otherwise. `num_classes`: C, when the labels do not show every class.
    """
    labels = _labels(labels)
    if features is None and logits is None:
        raise ValueError("give features= (a probe is refit on them), logits= (the model's own head), or both")
    if features is not None:
        return _probe_scores(labels, _floats("features", features, len(labels)),
                             None if logits is None else _floats("logits", logits, len(labels)),
                             method=method, measure=measure, l2=l2, num_classes=num_classes)
    logits = _floats("logits", logits, len(labels))
    if method == "auto" and head_inputs is None:
        method = "loss"  # influence needs what flows into the head
    ranking = resolve_ranking(method, "head", measure=measure)
    inputs = _floats("head_inputs", head_inputs, len(labels)) if head_inputs is not None else torch.zeros(len(labels), 0)
    if ranking.method in ("influence", "gradnorm") and head_inputs is None:
        raise ValueError(f"method {ranking.method} needs head_inputs= (the features that flow into the head)")
    scores, _ = method_scores(ranking.method, logits, inputs, labels, damping=ranking.damping,
                              measure=ranking.measure, curvature=ranking.curvature)
    return scores.numpy()


def _probe_scores(labels: torch.Tensor, features: torch.Tensor, logits: torch.Tensor | None, *, method: str,
                  measure: str | None, l2: float | None, num_classes: int | None) -> np.ndarray:
    """label_issue_scores on a probe refit on `features`; with the head's `logits`, the joint loss."""
    classes = num_classes or int(labels.max()) + 1
    if method == "auto" and logits is None and measure is None:
        method = "loss"  # the joint loss needs the head's logits
    ranking = resolve_ranking(method, "refit", measure=measure)
    if (ranking.method == "joint-loss") != (logits is not None):
        raise ValueError("the joint loss needs logits= beside features=" if logits is None else
                         f"logits= beside features= are read by the joint loss only, not by {ranking.method}")
    scores, _ = refit_scores(features, labels, classes, method=ranking.method, measure=ranking.measure,
                             l2=BoundaryOptions(l2=l2).resolved().l2, head_logits=logits)
    return scores.numpy()


def rank(scores, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """(rank, class rank) of every sample: 1 = the highest score overall / within its label; ties by position."""
    scores = np.asarray(scores, dtype=np.float64)
    order = rank_order(scores, [f"{i:012d}" for i in range(len(scores))])
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    codes = np.zeros(len(scores), dtype=np.int64) if labels is None else _labels(labels).numpy()
    class_ranks = np.empty(len(scores), dtype=np.int64)
    class_ranks[order] = class_ranks_in_order(codes[order])
    return ranks, class_ranks


def find_label_issues(scores, labels, *, fraction: float | None = None, count: int | None = None,
                      min_score: float | None = None, per_class: bool = False, min_per_class: int = 1) -> np.ndarray:
    """Which samples to remove (or review): a boolean mask, from the scores of `label_issue_scores`.

    Exactly one rule: the top `fraction` or `count` by rank, or every score of at least `min_score`; with
    `per_class`, that share or count from each label. Every label keeps at least `min_per_class` samples. This is
    `irank prune`'s rule, without the files.
    """
    ranks, class_ranks = rank(scores, labels)
    return removal_mask(np.asarray(scores, dtype=np.float64), ranks, class_ranks, _labels(labels).numpy(),
                        fraction=fraction, count=count, min_score=min_score, per_class=per_class,
                        min_per_class=min_per_class)


class _Indexed(Dataset):
    """A dataset of (input, label) read as irank's loaders read rows: (input, row, no error)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int):
        item, _ = self.dataset[row]
        return torch.as_tensor(item), row, None


def _collate(items):
    return torch.stack([item for item, _, _ in items]), torch.tensor([row for _, row, _ in items]), None


def _dataset_labels(dataset: Dataset, labels) -> torch.Tensor:
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [dataset[row][1] for row in range(len(dataset))]
    return _labels(labels)


def _probe_layer(model: nn.Module, head_name: str, loader: DataLoader, labels: torch.Tensor, num_classes: int,
                 device: torch.device) -> tuple[str, dict[str, torch.Tensor]]:
    """The layer --layer auto chooses, with the candidate layers' features (none: the model has only its head)."""
    names = block_candidates(model, head_name)
    if not names:
        return HEAD_INPUT, {}
    candidates = layer_features(model, names, loader, num_rows=len(labels), device=device)
    return choose_layer(candidates, labels, num_classes, l2=BoundaryOptions().resolved().l2).layer, candidates


def score_model(model: nn.Module, dataset: Dataset, *, labels=None, layer: str | None = "auto",
                method: str = "auto", batch_size: int = 128, device: str = "cpu") -> np.ndarray:
    """Scores of every sample of `dataset` (items `(input, label)`) under `model`, as `irank score` computes them.

    `layer` auto (default): the deepest block whose probe did not memorize the labels; a module name, or
    "head-input", to probe there; None for the model's own head. `labels`: the class indices, when reading them
    from the dataset (its `targets`, else every item) is not what you want. The dataset is read in this process.
    """
    where = torch.device(device)
    model = model.eval().to(where)
    labels = _dataset_labels(dataset, labels)
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, collate_fn=_collate)
    head_name, head = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]
    outputs = forward_pass(model, head, loader, num_rows=len(labels), device=where)
    if layer is None:
        return label_issue_scores(labels, logits=outputs.logits, head_inputs=outputs.head_inputs, method=method,
                                  num_classes=head.out_features)
    candidates = {}
    if layer == "auto":
        layer, candidates = _probe_layer(model, head_name, loader, labels, head.out_features, where)
    if layer == HEAD_INPUT:
        features = outputs.head_inputs
    else:
        features = candidates.get(layer)
        if features is None:
            features = layer_features(model, layer, loader, num_rows=len(labels), device=where)
    return label_issue_scores(labels, features=features, logits=outputs.logits if method in ("auto", "joint-loss") else None,
                              method=method, num_classes=head.out_features)
