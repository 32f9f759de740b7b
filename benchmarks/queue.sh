#!/usr/bin/env bash
# The suite's one sequential queue: data, the bases, then the peers on every base, then the report.
# Every step skips what is already done, so the queue can be stopped (kill its PID) and started again.
#   nice -n 19 nohup bash benchmarks/queue.sh > /work/bench/logs/queue.log 2>&1 &
# A failed step is logged ("!! failed") and the queue goes on; a restart retries it.
# The whole queue is one function, parsed before it runs: editing this file never changes a running queue.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && export PATH="$PWD/.venv/bin:$PATH"
# one torch thread for the suite's loops and for irank's CLI: the machine's other core stays free
export BENCH_THREADS=${BENCH_THREADS:-1} OMP_NUM_THREADS=${BENCH_THREADS:-1}
K5_BASES=${K5_BASES:-"aug-onecycle-idn40 plain-sgd-sym40 aug-onecycle-idn20 plain-sgd-idn40"}

step() {
  echo "== $(date '+%F %T') $*"
  "$@" || echo "!! failed ($?): $*"
}

queue() {
  step python benchmarks/data.py
  local bases
  bases=$(python benchmarks/bases.py --names)
  for base in $bases; do
    step python benchmarks/bases.py "$base"
    step python benchmarks/peers.py "$base" --only one-shot
  done
  for base in $bases; do step python benchmarks/peers.py "$base" --only cleanlab-k2; done
  for base in $bases; do step python benchmarks/peers.py "$base" --only aum; done
  for base in $bases; do step python benchmarks/peers.py "$base" --only post-train; done
  for base in $K5_BASES; do step python benchmarks/peers.py "$base" --only cleanlab-k5; done
  for base in $bases; do step python benchmarks/peers.py "$base" --only oracle; done
  step python benchmarks/report.py
  echo "== $(date '+%F %T') queue finished"
}

queue
exit
