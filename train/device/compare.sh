#!/bin/bash
# Device run (train/device/README.md): leave-sources-out comparisons of recipes on the packed cache,
# then final fits of three of them. $1: part a's folder, $2: the wheels' folder.
source "$(dirname "$0")/common.sh" "$@"
run base5 $C/base.yaml --folds 5 &
[ -n "$QUICK" ] || {
run ep12 $C/ep12.yaml --folds 5 &
run bblr $C/bblr.yaml --folds 5 &
run mix $C/mix.yaml --folds 5 &
run shift3 $C/shift3.yaml --folds 5 &
run seed1 $C/base.yaml --folds 5 --seed 1 &
run base10 $C/base.yaml --folds 10 & }
wait
echo "loso done $(( $(date +%s) - started ))s"
if [ "$(left)" -gt 150 ]; then
  fitrun full-ep12 $C/ep12.yaml & [ -n "$QUICK" ] || { fitrun full-bblr $C/bblr.yaml & fitrun full-mix $C/mix.yaml & }
  wait
fi
echo "all done $(( $(date +%s) - started ))s"
O=${OUT:-/tmp/out}; mkdir -p $O
tar czf $O/runs.tgz --exclude='*.pt' $R
for f in $R/full-*/model.pt; do [ -f "$f" ] && cp "$f" $O/$(basename $(dirname $f)).pt; done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
ls -la $O
