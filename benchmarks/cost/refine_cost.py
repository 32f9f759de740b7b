"""Cost of `irank refine --scope full` against a plain training loop over the same DataLoader (not run by CI).

    python benchmarks/cost/refine_cost.py SETTING [--epochs 2]

Both start from the same base checkpoint, train the whole network with the same SGD settings and the
same shuffled loader for the same epochs; refine's time includes reading the checkpoint and manifest,
saving its resume state after every epoch and writing its output. The plain loop runs twice: in the
default memory layout (the baseline) and in refine's placement (channels-last for conv nets, bf16 autocast
on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import irank

# the CIFAR benchmark's helpers (posttrain_cifar, cifar_data) live in benchmarks/cifar/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cifar"))
from posttrain_cifar import RUN, base_paths, plain_training_seconds

parser = argparse.ArgumentParser()
parser.add_argument("setting")
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()
checkpoint, manifest = base_paths(args.setting)
options = irank.TrainOptions(scope="full", epochs=args.epochs, lr=0.01, seed=0)
plain = plain_training_seconds(checkpoint, manifest, options)
nhwc = plain_training_seconds(checkpoint, manifest, options, placed=True)
with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    irank.refine(checkpoint, manifest, output=str(Path(folder) / "refined.safetensors"), train_options=options,
                 run_options=RUN)
    refine = time.perf_counter() - started
print(f"{args.setting}: refine --scope full {args.epochs} epochs {refine:.1f} s, plain loop {plain:.1f} s, "
      f"channels-last plain loop {nhwc:.1f} s; ratios {refine / plain:.2f} and {refine / nhwc:.2f} "
      f"({refine / args.epochs:.1f} s per epoch)")
