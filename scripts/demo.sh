#!/usr/bin/env bash
# The whole chain on the embedded synthetic benchmark (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo}"
BIN=.venv/bin
mkdir -p "$OUT"
step() { echo; echo "=== $*"; }

step "1/3 synthetic benchmark: 25 training tiles + 9 unseen-region tiles"
$BIN/glacier-train synth --out "$OUT/synth" --tiles 25 --size 512 512 --seed 0 --unseen-tiles 9

step "2/3 inspect and folds"
$BIN/glacier-train inspect "$OUT/synth/train" | tail -12
$BIN/glacier-train folds "$OUT/synth/train" --k 5 --block 2 --out "$OUT/folds.json"

step "3/3 per-pixel baseline (what a CNN must beat)"
$BIN/python benchmarks/pixel_baseline.py --data "$OUT/synth" --out "$OUT/pixel_baseline.json" | tail -6
