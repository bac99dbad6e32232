#!/bin/bash
# Device run: the bundled recipe's leave-sources-out fold networks (5 folds, seed 0, one process per
# fold), brought back as float16 state dicts (fold-N.f16.pt, ~7 MB each: five float32 artefacts
# would exceed what a call returns) with the run's folds.json and oof.npz: "the generic model" of
# each fold for tests/bench/bench_adapt.py. $1: part a's folder, $2: the wheels' folder.
source "$(dirname "$0")/common.sh" "$@"
F="0 1 2 3 4"; [ -n "$QUICK" ] && F="0 1"
q=${QUICK:+--epochs 1 --epoch-size 64}
for k in $F; do
  eval timeout -s INT $(( $(left) - 40 )) $T loso --manifest $M --out $R/generic --folds 5 --only-fold $k \
    --config $C/base.yaml $q > $R/generic-f$k.log 2>&1 &
done
wait
got=""; for k in $F; do [ -f $R/generic/fold-$k.npz ] && got="$got --only-fold $k"; done
eval timeout -s INT $(left) $T loso --manifest $M --out $R/generic --folds 5 $got --config $C/base.yaml > $R/generic.log 2>&1
echo "folds done rc=$? $(( $(date +%s) - started ))s"
O=${OUT:-/tmp/out}; mkdir -p $O
$PY - "$R/generic" "$O" <<'PY'
import sys, torch
from pathlib import Path
run, out = Path(sys.argv[1]), Path(sys.argv[2])
for model in sorted(run.glob("fold-*/model.pt")):
    payload = torch.load(model, map_location="cpu", weights_only=True)
    payload["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    torch.save(payload, out / f"{model.parent.name}.f16.pt")
PY
tar czf $O/generic.tgz --exclude='*.pt' -C $R generic
ls -la $O
