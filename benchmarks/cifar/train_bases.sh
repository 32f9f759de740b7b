#!/usr/bin/env bash
# Base checkpoints for the post-train benchmark (cached in bench-out/base; skipped when present).
# small-cnn, 30 epochs of plain SGD on the noisy labels, no augmentation: long enough to memorize.
#   bash benchmarks/cifar/train_bases.sh          # the benchmark's five bases
#   EXTRA=1 bash benchmarks/cifar/train_bases.sh  # and five more that check the default --method auto:
#     ce-sym60, ce-asym20, gce-sym20, ce-sym40-es (best epoch on the clean val.csv: stopped early) and
#     ce-sym40-aug (random crops and flips, which slow memorization)
set -euo pipefail
cd "$(dirname "$0")/../.."
data=bench-data/cifar10
mkdir -p bench-out/base
[ -f "$data/train-sym60.csv" ] || python benchmarks/cifar/cifar_data.py
train() {  # name setting loss [extra irank train options]
  local out=bench-out/base/$1.safetensors
  [ -f "$out" ] && return 0
  echo "training $1 on $2 with $3 ($(date +%T))"
  /usr/bin/time -f "%e s" irank train small-cnn "$data/train-$2.csv" -o "$out" --epochs 30 --lr 0.05 \
    --preprocess cifar10 --batch-size 128 --loss "$3" --seed 0 --device auto -q "${@:4}"
}
for setting in ${SETTINGS:-sym40 sym0 sym20 asym40}; do train "ce-$setting" "$setting" ce; done
train gce-sym40 sym40 gce
if [ -n "${EXTRA:-}" ]; then
  train ce-sym60 sym60 ce
  train ce-asym20 asym20 ce
  train gce-sym20 sym20 gce
  train ce-sym40-es sym40 ce --val "$data/val.csv"
  train ce-sym40-aug sym40 ce --augment crop-flip
fi
