"""Cost of `irank refine --scope full` against a plain training loop over the same DataLoader (not run by CI).

    python tests/bench/refine_cost.py SETTING [--epochs 2]

Both start from the same base checkpoint, train the whole network with the same SGD settings and the
same shuffled loader for the same epochs; refine's time includes reading the checkpoint and manifest,
saving its resume state after every epoch and writing its output. The plain loop runs twice: in the
default memory layout (the baseline) and in channels-last (the layout refine uses for conv nets).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import irank
from irank.data import batches, make_loader
from irank.loading import ModelOptions, prepare
from posttrain_cifar import RUN, base_paths

parser = argparse.ArgumentParser()
parser.add_argument("setting")
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()
checkpoint, manifest = base_paths(args.setting)
options = irank.TrainOptions(scope="full", epochs=args.epochs, lr=0.01, seed=0)



def plain_training_seconds(layout: torch.memory_format) -> float:
    """The same epochs as a plain loop, model and batches in `layout`."""
    prepared = prepare(checkpoint, manifest, ModelOptions())
    loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=RUN.batch_size,
                         num_workers=RUN.num_workers, shuffle=True, seed=0)
    labels = torch.from_numpy(prepared.labels)
    model = prepared.model.to(memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=options.lr, momentum=options.momentum,
                                weight_decay=options.weight_decay)
    started = time.perf_counter()
    for _ in range(args.epochs):
        for images, rows in batches(loader):
            loss = F.cross_entropy(model(images.contiguous(memory_format=layout)), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


plain = plain_training_seconds(torch.contiguous_format)
nhwc = plain_training_seconds(torch.channels_last)
with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    irank.refine(checkpoint, manifest, output=str(Path(folder) / "refined.safetensors"), train_options=options,
                 run_options=RUN)
    refine = time.perf_counter() - started
print(f"{args.setting}: refine --scope full {args.epochs} epochs {refine:.1f} s, plain loop {plain:.1f} s, "
      f"channels-last plain loop {nhwc:.1f} s; ratios {refine / plain:.2f} and {refine / nhwc:.2f} "
      f"({refine / args.epochs:.1f} s per epoch)")
