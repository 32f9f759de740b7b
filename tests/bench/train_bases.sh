#!/usr/bin/env bash
# Base checkpoints for the post-train benchmark (cached in bench-out/base; skipped when present).
# small-cnn, 30 epochs of plain SGD on the noisy labels, no augmentation: long enough to memorize.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=bench-data/cifar10
mkdir -p bench-out/base
[ -f "$data/train-sym40.csv" ] || python tests/bench/cifar_data.py
train() {  # name setting loss
  local out=bench-out/base/$1.safetensors
  [ -f "$out" ] && return 0
  echo "training $1 on $2 with $3 ($(date +%T))"
  /usr/bin/time -f "%e s" irank train small-cnn "$data/train-$2.csv" -o "$out" --epochs 30 --lr 0.05 \
    --preprocess cifar10 --batch-size 128 --loss "$3" --seed 0 --device auto -q
}
for setting in ${SETTINGS:-sym40 sym0 sym20 asym40}; do train "ce-$setting" "$setting" ce; done
train gce-sym40 sym40 gce
