"""--scope refit: the head replaced by an L2-regularized softmax regression fitted from scratch on frozen features
(convex, deterministic), optionally on a layer's pooled output, the model then cut there."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irank.core.linear import fit_softmax_regression
from irank.model.forward import forward_pass
from irank.model.inputs import make_shard_loader
from irank.model.placement import Placement
from irank.model.prepare import Prepared
from irank.model.training import RefineResult
from irank.model.validation import ValidationSet
from irank.options import RunOptions, TrainOptions
from irank.runtime.distributed import all_or_none, local_rows, shard_of
from irank.runtime.errors import UsageError
from irank.runtime.progress import Reporter


def attach_probe(prepared: Prepared, layer: str, in_features: int) -> None:
    """Turn the prepared model into backbone-up-to-`layer` + a fresh linear `probe` head (in place)."""
    from irank.model.layers import ProbeModel

    if prepared.checkpoint is not None and prepared.checkpoint.metadata.get("probe"):
        raise UsageError("this checkpoint is already cut at a layer; refit --layer on the original checkpoint")
    prepared.model = ProbeModel(prepared.model, layer, in_features, len(prepared.classes))
    prepared.head_name, prepared.head = "probe", prepared.model.probe
    prepared.extra_metadata["probe"] = {"layer": layer, "in_features": in_features}


def refit_head(prepared: Prepared, options: TrainOptions, run: RunOptions, device: "torch.device | Placement",
               reporter: Reporter, validation: ValidationSet | None) -> RefineResult:
    """Replace the head by the L2-regularized softmax regression fitted from scratch on frozen features:
    the head's input, or with `options.layer` a layer's pooled output (the model is then cut there)."""
    from irank.model.layers import layer_features

    place = Placement.of(device)
    device = place.device
    model = place.place_model(prepared.model)
    shard = shard_of(len(prepared.labels))  # None with one process
    with all_or_none():
        loader, num_rows, first_row = make_shard_loader(prepared.manifest.resolved_paths(), prepared.preprocess,
                                                        batch_size=run.batch_size, num_workers=run.num_workers, shard=shard)
        if options.layer:
            head_inputs = layer_features(model, options.layer, loader, num_rows=num_rows, device=place,
                                         reporter=reporter, first_row=first_row)
        else:
            head_inputs = forward_pass(model, prepared.head, loader, num_rows=num_rows, device=place,
                                       reporter=reporter, description="head inputs", first_row=first_row).head_inputs
    if options.layer:
        attach_probe(prepared, options.layer, head_inputs.shape[1])
    model, head = place.place_model(prepared.model), prepared.head
    labels = local_rows(torch.from_numpy(prepared.labels), shard)
    weight, bias = fit_softmax_regression(head_inputs, labels, head.out_features, l2=options.l2, shard=shard)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        if head.bias is not None:
            head.bias.copy_(bias.to(head.bias))
        else:
            reporter.warn("the head has no bias: the refit's intercept is dropped")
        logits = head(head_inputs.to(device)).float().cpu()
    if shard is None:
        record = {"epoch": 1, "train_loss": float(F.cross_entropy(logits, labels))}
    else:
        summed = shard.sum(F.cross_entropy(logits, labels, reduction="sum").reshape(1))
        record = {"epoch": 1, "train_loss": float(summed[0] / shard.total)}
    if validation is not None:
        record["val_accuracy"] = validation.accuracy(prepared, reporter, cache_head_inputs=True)
    return RefineResult(history=[record], best_epoch=1)
