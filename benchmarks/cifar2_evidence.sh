#!/usr/bin/env bash
# The CIFAR-2 evidence that needs more than the benchmark run (benchmarks/RESULTS.md):
#   1. projection dimension: TRAK, D-TRAK, L_Avg, L_2 at k = 256 .. 4096 and the exact kernel;
#   2. claim 4: trak-ensemble over 1, 2, 4, 8 pool models against single-model D-TRAK;
#   3. a second training seed of every LDS subset (the seed-to-seed ceiling);
#   4. the counterfactual evaluation (8 generated targets, top 100 of 500 removed).
# Every step reuses the benchmark run RUN (make bench-cifar2) and resumes after a kill: run
# this script again and it continues where it stopped. Steps 1-3 work in sibling run
# directories RUN-<step> whose model, generated images, features and subset models are
# links into RUN, so nothing is trained twice; each has its own scores and results.
#
#   bash benchmarks/cifar2_evidence.sh [RUN] [DATA]      # defaults: bench-runs/cifar2, ../shared/data/cifar10
set -euo pipefail
RUN=$(realpath "${1:-bench-runs/cifar2}")
DATA=$(realpath "${2:-../shared/data/cifar10}")
DTRAK=${DTRAK:-.venv/bin/dtrak}
CONFIG=configs/cifar2-bench.toml
[ -f "$RUN/model/done.json" ] || { echo "no finished benchmark run at $RUN; run make bench-cifar2 first" >&2; exit 2; }

# derive NEW LINK...: a sibling run directory whose LINKs point into RUN
derive() {
  local new=$1; shift
  mkdir -p "$new"
  for part in "$@"; do
    mkdir -p "$RUN/$part"
    [ -e "$new/$part" ] || ln -s "$RUN/$part" "$new/$part"
  done
}

K_METHODS='["trak", "dtrak", "kernel-avg", "kernel-l2"]'
K_OUTPUTS='["loss", "square", "avg", "l2"]'
for k in 256 512 1024 2048 none; do
  new="$RUN-k$k"
  derive "$new" data model gen features lds
  if [ "$k" = none ]; then proj=(--set attribution.projector='"none"'); else proj=(--set attribution.proj_dim=$k); fi
  echo "== projection k = $k: $new"
  "$DTRAK" run "$CONFIG" --out "$new" -q --set data.root="\"$DATA\"" "${proj[@]}" \
    --set "attribution.methods=$K_METHODS" --set "attribution.outputs=$K_OUTPUTS" \
    --stages featurize,score,lds
done

echo "== ensembles: $RUN-ensemble"
derive "$RUN-ensemble" data model gen features lds pool
"$DTRAK" run "$CONFIG" --out "$RUN-ensemble" -q --set data.root="\"$DATA\"" \
  --set 'attribution.methods=["trak", "dtrak", "trak-ensemble-1", "trak-ensemble-2", "trak-ensemble-4", "trak-ensemble-8"]' \
  --set 'attribution.outputs=["loss", "square"]' --stages featurize,score,lds

echo "== two training seeds: $RUN-seeds"
derive "$RUN-seeds" data model gen features
mkdir -p "$RUN-seeds/lds/models"
cp -n "$RUN/lds/masks.npy" "$RUN-seeds/lds/masks.npy"
for m in "$RUN"/lds/models/m*-s0; do
  [ -e "$RUN-seeds/lds/models/$(basename "$m")" ] || ln -s "$m" "$RUN-seeds/lds/models/$(basename "$m")"
done
"$DTRAK" run "$CONFIG" --out "$RUN-seeds" -q --set data.root="\"$DATA\"" --set 'lds.seeds=[0, 1]' \
  --set 'attribution.methods=["trak", "dtrak", "kernel-avg", "kernel-l1", "kernel-l2", "trak@100", "dtrak@100", "pixel-cos", "random"]' \
  --stages featurize,score,lds

echo "== counterfactual: $RUN"
"$DTRAK" counterfactual --out "$RUN" --config "$CONFIG" -q --set data.root="\"$DATA\"" \
  --set counterfactual.n_targets=8
"$DTRAK" report "$RUN" -q
echo "done: $RUN-k*, $RUN-ensemble, $RUN-seeds, $RUN/results/counterfactual.json"
