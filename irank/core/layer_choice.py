"""Which decision boundary to measure influence on: the checkpoint's own head, or a regularized linear
probe refit on a chosen layer's features (`--boundary refit --layer NAME|auto --l2 L`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from irank.core.linear import fit_device, fit_standardized, standardizer
from irank.core.probe import heldout_probe_loss
from irank.core.protocols import Log, silent

CHOICE_ROWS = 4096  # the default sample for choose_layer: its cost stays flat in n


@dataclass
class LayerChoice:
    layer: str
    how: str
    figures: dict[str, dict] = field(default_factory=dict)  # layer → {dims, heldout_loss}
    head_label_fit: float | None = None  # the share of the given labels the checkpoint's own head predicts


MEMORIZED_AGREEMENT = 0.99


def choice_sample(num_rows: int, *, limit: int | None = None, seed: int = 0) -> torch.Tensor | None:
    """Row indices (sorted) of a seeded random sample of `limit` (CHOICE_ROWS) rows, or None when there are no more."""
    limit = CHOICE_ROWS if limit is None else limit
    if num_rows <= limit:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[:limit].sort().values


def layer_probe(values: torch.Tensor, labels: torch.Tensor, num_classes: int, *, l2: float,
                device: torch.device | None = None):
    """The layer choice's probe on one layer's features: standardized, in float32 (the choice compares
    losses that differ in the first decimal, and it is 3× faster), fitted on the given labels, on `device`
    where `linear.fit_device` allows (a CUDA device), else on the CPU.
    Returns ((mean, scale), the standardized features (on the fit's device), (weight, bias) (on the CPU),
    agreement with the given labels)."""
    mean, scale = standardizer(values)
    standardized = ((values.double() - mean) / scale).float()
    where = fit_device(standardized, device)
    standardized, fit_labels = standardized.to(where), labels.to(where)
    weight, bias = fit_standardized(standardized, fit_labels, num_classes, l2=l2)
    agreement = float(((standardized @ weight.T + bias).argmax(1) == fit_labels).double().mean())
    return (mean, scale), standardized, (weight.cpu(), bias.cpu()), agreement


def choose_layer(features: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, *, l2: float,
                 log: Log | None = None, max_rows: int | None = None,
                 device: torch.device | None = None) -> LayerChoice:
    """The deepest structure that did not memorize the given labels.

    A layer whose probe reproduces the given labels (in-sample agreement ≥ 0.99) has memorized them,
    wrong ones included: its held-out loss looks excellent because the network saw every sample, and
    ranking on it fails (CIFAR-10, 40% noise: AUROC 0.70 on such a layer against 0.85 on the next one
    down). Among the other layers the lowest 3-fold held-out probe loss on the given labels wins (a
    memorized layer's held-out loss is then not computed); if every layer memorized, the lowest
    held-out loss overall. Past `max_rows` (default CHOICE_ROWS) rows, all of this runs on a seeded random sample of rows.
    `device`: where the probes may be fitted (`layer_probe`).
    """
    log = log or silent
    rows = choice_sample(len(labels), limit=max_rows)
    if rows is not None:
        labels = labels[rows]
        log(f"choosing the layer on a random sample of {len(rows):,} rows")
    figures: dict[str, dict] = {}
    fits = {}
    for name, values in features.items():
        _, standardized, (weight, bias), agreement = layer_probe(values if rows is None else values[rows], labels,
                                                                 num_classes, l2=l2, device=device)
        fits[name] = (standardized, (weight, bias))
        figures[name] = {"dims": int(values.shape[1]), "agreement": agreement,
                         "memorized": agreement >= MEMORIZED_AGREEMENT, "heldout_loss": None}
    pool = [name for name in figures if not figures[name]["memorized"]] or list(figures)
    for name, entry in figures.items():
        if name in pool:
            standardized, fit = fits[name]
            entry["heldout_loss"] = heldout_probe_loss(standardized, labels, num_classes, l2=l2, init=fit)
            heldout = f"held-out probe loss {entry['heldout_loss']:.4f}"
        else:
            heldout = "memorized them: not a candidate"
        log(f"layer {name}: {entry['dims']} features, probe agrees with {entry['agreement']:.1%} of the "
                      f"given labels, {heldout}")
    best = min(pool, key=lambda name: (figures[name]["heldout_loss"], name))
    how = ("lowest 3-fold held-out probe loss among the layers whose probe did not memorize the given labels"
           if not figures[best]["memorized"] else
           "every layer memorized the given labels; lowest 3-fold held-out probe loss")
    if rows is not None:
        how += f" (on a random sample of {len(rows):,} rows)"
    return LayerChoice(best, how, figures)


def choose_layer_by_accuracy(features: dict[str, torch.Tensor], labels: torch.Tensor,
                             val_features: dict[str, torch.Tensor], val_labels: torch.Tensor, num_classes: int, *,
                             l2: float, log: Log | None = None,
                             device: torch.device | None = None) -> LayerChoice:
    """Among the layers whose probe did not memorize the given labels (as in `choose_layer`), the one whose
    probe, fitted on the given (noisy) labels, is most accurate on a clean labelled set.

    Clean accuracy alone is the wrong question: on a network that memorized its noisy labels, the probes
    of its last layers generalize best to clean data and rank the wrong labels worst (CIFAR-10, 40%
    noise: `pool` 0.734 AUROC against 0.851 at `features.2`), because they agree with every given label.
    So memorized layers stay out, as in `choose_layer`, and clean accuracy replaces the held-out loss on
    noisy labels among the rest. Each probe is fitted as `choose_layer` fits it (standardized,
    float32); the val rows are standardized with the fitted rows' statistics. Ties go to the deeper layer.
    """
    log = log or silent
    figures: dict[str, dict] = {}
    for name, values in features.items():
        (mean, scale), _, (weight, bias), agreement = layer_probe(values, labels, num_classes, l2=l2, device=device)
        held = ((val_features[name].double() - mean) / scale).float()
        accuracy = float(((held @ weight.T + bias).argmax(1) == val_labels).double().mean())
        memorized = agreement >= MEMORIZED_AGREEMENT
        figures[name] = {"dims": int(values.shape[1]), "agreement": agreement, "memorized": memorized,
                         "val_accuracy": accuracy}
        log(f"layer {name}: {values.shape[1]} features, probe agrees with {agreement:.1%} of the given labels"
                      f"{' (memorized them: not a candidate)' if memorized else ''}, {accuracy:.1%} accurate on --val")
    order = list(features)
    pool = [name for name in order if not figures[name]["memorized"]] or order
    best = max(pool, key=lambda name: (figures[name]["val_accuracy"], order.index(name)))
    how = (f"highest accuracy on --val ({len(val_labels):,} rows) of a probe fitted on the given labels, among the "
           "layers whose probe did not memorize them" if not figures[best]["memorized"] else
           f"every layer memorized the given labels; highest accuracy on --val ({len(val_labels):,} rows)")
    return LayerChoice(best, how, figures)


