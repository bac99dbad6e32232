#!/bin/bash
# What compare.sh and seeds.sh share (sourced): wheels, the unpacked cache, and run/fitrun.
# $1: part a's folder, $2: the wheels' folder.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
PY=${PY:-python3}; export PYTHONPATH=$PWD
A=${1:-/root/keep/a}; W=${2:-/root/keep/.whl}; QUICK=${QUICK:-}
test -f "$A/eval.f16.xz" || { echo "part a missing at $A"; exit 3; }
if [ -d "$W" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$W"/*.whl || exit 4
  export PYTHONPATH=/tmp/site:$PWD
fi
$PY .devcache/b/unpack.py "$A" || exit 5
M=.devcache/b/manifest.csv; C=.devcache/b; R=${RUNS:-runs}
T="$PY -c 'from train.cli import main; main()'"
extra=${QUICK:+--epochs 1 --epoch-size 64 --only-fold 0}
started=$(date +%s); DEADLINE=${DEADLINE:-480}
left() { echo $(( DEADLINE - ($(date +%s) - started) )); }
run() { name=$1; shift; echo "start $name"; eval timeout -s INT $(left) $T loso --manifest $M --out $R/$name --config "$@" $extra > $R/$name.log 2>&1; echo "end $name rc=$? $(( $(date +%s) - started ))s"; }
fitrun() { name=$1; shift; eval timeout -s INT $(left) $T fit --manifest $M --out $R/$name --config "$@" ${QUICK:+--epochs 1 --epoch-size 64} > $R/$name.log 2>&1; echo "end $name rc=$? $(( $(date +%s) - started ))s"; }
mkdir -p $R
