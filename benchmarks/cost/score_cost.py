"""Cost of `irank score` as a multiple of a plain inference pass over the same DataLoader (not run by CI).

    python benchmarks/cost/score_cost.py SETTING [--boundary head|refit] [--repeats 3] [--manifest CSV]

`--manifest` times another manifest than the setting's 10k training subset (e.g. all 50,000 CIFAR-10
training images: `irank manifest bench-data/cifar10/train -o bench-data/cifar10/train-all.csv`).

Three things are timed in turn, `--repeats` times each, in one process, and the medians compared: the plain
loop (default memory layout: the issue's baseline), the plain loop in channels-last (the layout `score`
uses for conv nets: the fairer baseline), and `score`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import irank
from irank.options import BoundaryOptions

# the CIFAR benchmark's helpers (posttrain_cifar, cifar_data) live in benchmarks/cifar/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cifar"))
from posttrain_cifar import DATA, ROOT, RUN, plain_inference_seconds

parser = argparse.ArgumentParser()
parser.add_argument("setting")
parser.add_argument("--boundary", default="head")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--manifest", default=None)
args = parser.parse_args()
checkpoint = str(ROOT / "bench-out" / "base" / f"{args.setting}.safetensors")
manifest = args.manifest or str(DATA / f"train-{args.setting.split('-')[1]}.csv")
inference_times, nhwc_times, score_times = [], [], []
for _ in range(args.repeats):
    inference_times.append(plain_inference_seconds(checkpoint, manifest))
    nhwc_times.append(plain_inference_seconds(checkpoint, manifest, placed=True))
    started = time.perf_counter()
    result = irank.score(checkpoint, manifest, run_options=RUN, boundary=BoundaryOptions(kind=args.boundary))
    score_times.append(time.perf_counter() - started)
infer, seconds = statistics.median(inference_times), statistics.median(score_times)
nhwc = statistics.median(nhwc_times)
print(f"{args.setting} --boundary {args.boundary}: score {seconds:.1f} s, plain loop {infer:.1f} s, channels-last plain "
      f"loop {nhwc:.1f} s (medians of {args.repeats}); ratios {seconds / infer:.2f} and {seconds / nhwc:.2f}, curvature {result.sidecar['parameters'].get('curvature')}, "
      f"layer {result.sidecar['parameters'].get('layer')}")
