"""Cost of `irank score` as a multiple of a plain inference pass over the same DataLoader (not run by CI).

    python tests/bench/score_cost.py SETTING [--boundary head|refit]
"""

from __future__ import annotations

import argparse
import time

import irank
from irank.boundary import BoundaryOptions
from posttrain_cifar import DATA, ROOT, RUN, plain_inference_seconds

parser = argparse.ArgumentParser()
parser.add_argument("setting")
parser.add_argument("--boundary", default="head")
args = parser.parse_args()
checkpoint = str(ROOT / "bench-out" / "base" / f"{args.setting}.safetensors")
manifest = str(DATA / f"train-{args.setting.split('-')[1]}.csv")
infer = plain_inference_seconds(checkpoint, manifest)
started = time.perf_counter()
result = irank.score(checkpoint, manifest, run_options=RUN, boundary=BoundaryOptions(kind=args.boundary))
seconds = time.perf_counter() - started
print(f"{args.setting} --boundary {args.boundary}: score {seconds:.1f} s, inference {infer:.1f} s, ratio {seconds / infer:.2f}, "
      f"curvature {result.sidecar['parameters'].get('curvature')}, layer {result.sidecar['parameters'].get('layer')}")
