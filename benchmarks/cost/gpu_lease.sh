#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then benchmarks/cost/gpu_cost.py (not run by CI).
# The machine has its own python3 with torch; irank runs from this checkout (PYTHONPATH). CIFAR-10's archives
# travel in bench-data/archives (copy ../shared/data/cifar10/*.tar.gz there), the small-cnn base in bench-out/base
# (benchmarks/cifar/train_bases.sh; gpu_cost.py trains it when it is missing):
#   run(command="BENCH_TIMEOUT=400 BENCH_ARGS='--deadline 290' bash benchmarks/cost/gpu_lease.sh",
#       carry=["bench-data/archives", "bench-out/base"], timeout_s=570)
# (a lease has 15 minutes of device time, the machine's start included: --deadline skips the sections that would
# start late, and every finished section is already in the JSON file)
# Everything it prints goes to $OUT/log too; gpu_cost.py writes $OUT/gpu_cost.json as it goes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export IRANK_CIFAR_ARCHIVES=$PWD/bench-data/archives
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
  nproc
  timeout 150 python3 -m pytest -q -s -p no:cacheprovider -k "cuda or gpu" tests/test_transfer.py tests/test_linear.py tests/test_probe.py
  timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/cost/gpu_cost.py --json "$OUT/gpu_cost.json" ${BENCH_ARGS:-}
} 2>&1 | tee "$OUT/log"
