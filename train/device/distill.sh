#!/bin/bash
# Device run (train/device/README.md; results-2026-12-04b-h200.md): the bundled recipe as teacher
# under leave-sources-out (5 folds, seed 0, fold networks kept), then MobileNetV3-Small students
# distilled from its fold-N networks, one process per fold; full fits of the long students from
# the bundled model meanwhile (STUDENTS, FULL: which ones). $1: part a's folder, $2: the wheels'
# folder. QUICK=1: folds 0 and 1, one tiny epoch each (a smoke test on a CPU).
source "$(dirname "$0")/common.sh" "$@"
F="0 1 2 3 4"; [ -n "$QUICK" ] && F="0 1"
q=${QUICK:+--epochs 1 --epoch-size 64}
# Folds must end in time for their collection and the tar: 45 s before the deadline.
cutoff() { echo $(( $(left) - 45 )); }
# The students' yamls with teacher: this runs dir's teacher run (or, for a full fit, the bundled model).
mkdir -p $R/cfg
for s in student8 student-long student-long-mix; do
  sed "s#^teacher:.*#teacher: $R/teacher#" $C/$s.yaml > $R/cfg/$s.yaml
  sed "s#^teacher:.*#teacher: sorter/model/default/model.pt#" $C/$s.yaml > $R/cfg/full-$s.yaml
done
fold() { name=$1 k=$2; shift 2; eval timeout -s INT $(cutoff) $T loso --manifest $M --out $R/$name --folds 5 --only-fold $k --config "$@" $q > $R/$name-f$k.log 2>&1; echo "end $name fold $k rc=$? $(( $(date +%s) - started ))s"; }
folds() { name=$1; shift; echo "start $name $(( $(date +%s) - started ))s"; pids=""; for k in $F; do fold $name $k "$@" & pids="$pids $!"; done; wait $pids; }
# The run's metrics over the folds that finished (each fold process wrote only its own fold).
collect() {
  name=$1; shift; got=""
  for k in $F; do [ -f $R/$name/fold-$k.npz ] && got="$got --only-fold $k"; done
  [ -n "$got" ] || { echo "collect $name: no fold finished"; return; }
  eval timeout -s INT $(left) $T loso --manifest $M --out $R/$name --folds 5 $got --config "$@" > $R/$name.log 2>&1
  echo "collect $name ($got) rc=$? $(( $(date +%s) - started ))s"
}
# Full fits (all sources) learn from the bundled model; like the folds, they stop 45 s early.
full() { eval timeout -s INT $(cutoff) $T fit --manifest $M --out $R/full-$1 --config $R/cfg/full-$1.yaml $q > $R/full-$1.log 2>&1; echo "end full-$1 rc=$? $(( $(date +%s) - started ))s"; }
# Which students (STUDENTS) and full fits (FULL) run: all by default, fewer when time is short.
STUDENTS=${STUDENTS:-student8 student-long student-long-mix}; FULL=${FULL-student-long student-long-mix}
[ -n "$QUICK" ] && FULL=student-long
# Stage 1: the teacher's folds; the full fits need only the bundled model, so they start now
# (folds waits for its own folds only).
for s in $FULL; do full $s & done
folds teacher $C/base.yaml
ls $R/teacher/fold-*/model.pt
# Stage 2: the students, each fold learning from the teacher's network of that fold.
spids=""; for s in $STUDENTS; do folds $s $R/cfg/$s.yaml & spids="$spids $!"; done
wait $spids
echo "loso done $(( $(date +%s) - started ))s"
# (the teacher's collection rewrites its folds.json, which the students read: only now)
for s in teacher $STUDENTS; do
  cfg=$R/cfg/$s.yaml; [ $s = teacher ] && cfg=$C/base.yaml
  collect $s $cfg &
done
wait
echo "all done $(( $(date +%s) - started ))s"
O=${OUT:-/tmp/out}; mkdir -p $O
tar czf $O/runs.tgz --exclude='*.pt' $R
for f in $R/full-*/model.pt; do [ -f "$f" ] && cp "$f" $O/$(basename $(dirname $f)).pt; done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
ls -la $O
