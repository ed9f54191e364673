#!/usr/bin/env bash
# The prepared device check (benchmarks/device_check.py says what it measures): at most about
# 8 minutes on one GPU, every figure as JSON and a markdown table in the output folder.
#
#   bash benchmarks/device_check.sh [--device auto|cuda|cuda:N|cpu] [--tiny] [--out DIR]
#
# DIR defaults to $OUT (the device machine's output folder) or benchmarks/device-check-out.
# It runs the CUDA-marked tests first (`pytest -m cuda`: features, scores and projectors on
# CUDA against the CPU; they skip where torch sees no GPU), then the measurements.
# `--device cpu --tiny` runs the same code on a CPU in about a minute (the test suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=auto TINY= DIR=${OUT:-benchmarks/device-check-out}
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=--tiny; shift ;;
    --out) DIR=$2; shift 2 ;;
    *) echo "device_check.sh: unknown argument $1 (use --device D, --tiny, --out DIR)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then PY=python3; export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; fi
mkdir -p "$DIR"
echo "== CUDA-marked tests"
# a failure is reported in the JSON and the exit status, after the measurements
"$PY" -m pytest -m cuda -q -p no:cacheprovider tests > "$DIR/cuda_tests.txt" 2>&1 || true
tail -n 1 "$DIR/cuda_tests.txt"
echo "== measurements"
"$PY" benchmarks/device_check.py --device "$DEVICE" $TINY --out "$DIR" --cuda-tests "$DIR/cuda_tests.txt"
