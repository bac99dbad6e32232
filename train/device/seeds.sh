#!/bin/bash
# Device run (train/device/README.md): the bundled recipe and mixup at two more seeds (folds).
source "$(dirname "$0")/common.sh" "$@"
for sd in 1 2; do run base-s$sd $C/base.yaml --folds 5 --seed $sd & run mix-s$sd $C/mix.yaml --folds 5 --seed $sd & done
wait
echo "loso done $(( $(date +%s) - started ))s"
O=${OUT:-/tmp/out}; mkdir -p $O
tar czf $O/runs.tgz --exclude='*.pt' $R
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
ls -la $O
