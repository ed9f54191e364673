#!/usr/bin/env bash
# LDS of the factored kron projector against SJLT at equal proj_dim on the digits demo
# (issue 20). Two run directories:
#   RUN       the digits preset (the `dtrak demo` configuration: sjlt, proj_dim 2048, K = 10,
#             vmap gradients), methods trak and dtrak only (outputs loss, square);
#   RUN-kron  a sibling whose trained model, generated images and LDS pool (subset models,
#             ground truth) are links into RUN (as cifar2_evidence.sh's `derive`), with
#             attribution.projector = kron, attribution.gradients = hooks, the same proj_dim;
#             stages featurize, score, lds.
# Then benchmarks/kron_vs_sjlt.py compares the two runs' saved LDS predictions on the same
# subsets and ground truth: LDS(kron) - LDS(sjlt) with a paired bootstrap interval (the
# resampling of dtrak.lds.difference), val and gen targets, trak and dtrak.
# With SEED1=1 (the default) two more siblings, RUN-sjlt-seed1 and RUN-kron-seed1, repeat
# both with attribution.proj_seed = 1: sjlt seed 1 - sjlt seed 0 is the projection-seed
# difference that the subset bootstrap leaves out, the yardstick for kron - sjlt.
# Resumable: run it again after a kill and finished stages are skipped.
#
#   bash benchmarks/kron_vs_sjlt.sh [RUN] [N_SUBSETS]   # defaults: bench-runs/digits-kvs, 20 (the preset's)
set -euo pipefail
RUN=$(realpath -m "${1:-bench-runs/digits-kvs}")
M=${2:-20}
SEED1=${SEED1:-1}
DTRAK=${DTRAK:-.venv/bin/dtrak}
# one torch thread per process unless told otherwise: on a loaded 2-core machine two threads
# per process (torch's default) ran the training about 20x slower than on a quiet one
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
COMMON=(--set 'attribution.methods=["trak", "dtrak"]' --set 'attribution.outputs=["loss", "square"]'
        --set "lds.n_subsets=$M")
loadavg() { "$PY" -c 'import os; print("load average %.2f %.2f %.2f" % os.getloadavg())'; }

echo "== sjlt (vmap): $RUN   [$(loadavg)]"
"$DTRAK" run digits --out "$RUN" -q "${COMMON[@]}" \
  --stages data,train,generate,featurize,score,lds
echo "   [$(loadavg)]"

derive() {  # derive NEW LINK...: a sibling run directory whose LINKs point into RUN
  local new=$1; shift
  mkdir -p "$new"
  for part in "$@"; do
    mkdir -p "$RUN/$part"
    [ -e "$new/$part" ] || ln -s "$RUN/$part" "$new/$part"
  done
}
derive "$RUN-kron" data model gen lds
echo "== kron (hooks): $RUN-kron   [$(loadavg)]"
"$DTRAK" run digits --out "$RUN-kron" -q "${COMMON[@]}" \
  --set 'attribution.projector="kron"' --set 'attribution.gradients="hooks"' \
  --stages featurize,score,lds
echo "   [$(loadavg)]"

"$PY" benchmarks/kron_vs_sjlt.py "$RUN" "$RUN-kron" --out "$RUN-kron/results/kron_vs_sjlt.json"
echo "   [$(loadavg)]"
[ "$SEED1" = 1 ] || exit 0

for proj in sjlt kron; do
  new="$RUN-$proj-seed1"
  derive "$new" data model gen lds
  extra=()
  [ "$proj" = kron ] && extra=(--set 'attribution.projector="kron"' --set 'attribution.gradients="hooks"')
  echo "== $proj, proj_seed 1: $new   [$(loadavg)]"
  "$DTRAK" run digits --out "$new" -q "${COMMON[@]}" "${extra[@]}" --set attribution.proj_seed=1 \
    --stages featurize,score,lds
  echo "   [$(loadavg)]"
done
echo "== kron - sjlt at projection seed 1"
"$PY" benchmarks/kron_vs_sjlt.py "$RUN-sjlt-seed1" "$RUN-kron-seed1" \
  --out "$RUN-kron-seed1/results/kron_vs_sjlt.json"
echo "== yardstick: sjlt seed 1 - sjlt seed 0"
"$PY" benchmarks/kron_vs_sjlt.py "$RUN" "$RUN-sjlt-seed1" --labels sjlt1,sjlt0 \
  --out "$RUN-sjlt-seed1/results/sjlt1_vs_sjlt0.json"
echo "== kron seed 1 - kron seed 0"
"$PY" benchmarks/kron_vs_sjlt.py "$RUN-kron" "$RUN-kron-seed1" --labels kron1,kron0 \
  --out "$RUN-kron-seed1/results/kron1_vs_kron0.json"
echo "   [$(loadavg)]"
