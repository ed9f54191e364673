#!/usr/bin/env bash
# TRAK, D-TRAK, DAS (four variants) and K-FAC / EK-FAC influence on one protocol: the
# CIFAR-2 benchmark run's subset models and ground truth (benchmarks/RESULTS.md, "Beyond
# D-TRAK"). Works in a sibling run directory RUN-beyond whose data, model, generated images
# and LDS pool are links into RUN (nothing is retrained); features are computed there from
# nothing, one method at a time, so each method's cost is measured on its own
# (RUN-beyond/cost.txt: CPU seconds, user and system, and wall seconds). Resumes after a kill.
#
#   bash benchmarks/beyond_dtrak.sh [RUN] [DATA]     # defaults: bench-runs/cifar2, ../shared/data/cifar10
set -euo pipefail
RUN=$(realpath "${1:-bench-runs/cifar2}")
DATA=$(realpath "${2:-../shared/data/cifar10}")
DTRAK=${DTRAK:-.venv/bin/dtrak}
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=configs/cifar2-bench.toml
[ -f "$RUN/lds/masks.npy" ] || { echo "no LDS pool at $RUN/lds; run make bench-cifar2 first" >&2; exit 2; }
NEW="$RUN-beyond"
mkdir -p "$NEW"
for part in data model gen lds; do
  [ -e "$NEW/$part" ] || ln -s "$RUN/$part" "$NEW/$part"
done
METHODS='["trak", "dtrak", "das", "das-sq", "das-loo", "das-loo-sq", "kfac-if", "ekfac-if"]'
common=(--config "$CONFIG" --out "$NEW" -q --set data.root="\"$DATA\""
        --set "attribution.methods=$METHODS" --set 'attribution.outputs=["loss", "square"]')
# each method's own cost from nothing: its features (or factors and gradients) and one score
# matrix per target set; kfac-if reuses ekfac-if's stored gradients (its own cost: the K-FAC
# eigenbasis and the scores)
for m in trak dtrak das ekfac-if kfac-if; do
  if [ -f "$NEW/scores/$m/gen.npy" ]; then continue; fi
  echo "== $m"
  /usr/bin/time -f "$m: %U s user, %S s system, %e s wall" -a -o "$NEW/cost.txt" \
    "$DTRAK" score "${common[@]}" --method "$m"
done
echo "== LDS of every method on the run's subset models"
"$DTRAK" lds "${common[@]}"
"$PYTHON" benchmarks/beyond_dtrak_table.py "$NEW" | tee "$NEW/table.md"
cat "$NEW/cost.txt"
