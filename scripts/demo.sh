#!/usr/bin/env bash
# The whole chain on the embedded synthetic benchmark, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo}"
BIN=.venv/bin
mkdir -p "$OUT"
step() { echo; echo "=== $*"; }
start=$(date +%s)

step "1/6 synthetic benchmark: 25 training tiles + 9 unseen-region tiles (512x512)"
$BIN/glacier-train synth --out "$OUT/synth" --tiles 25 --size 512 512 --seed 0 --unseen-tiles 9

step "2/6 inspect and folds"
$BIN/glacier-train inspect "$OUT/synth/train" | tail -12
$BIN/glacier-train folds "$OUT/synth/train" --k 5 --block 2 --out "$OUT/folds.json"

step "3/6 per-pixel baseline (the bar the CNN must clear)"
$BIN/python benchmarks/pixel_baseline.py --data "$OUT/synth" --folds "$OUT/folds.json" \
    --out "$OUT/pixel_baseline.json" | grep -E '"(mcc_unseen|mean_fold_mcc)"'

step "4/6 5-fold CV with configs/quickstart.yaml (resumable: re-run to continue)"
$BIN/glacier-train cv --config configs/quickstart.yaml --data "$OUT/synth/train" \
    --folds "$OUT/folds.json" --seeds 0 --out "$OUT/weights"

step "5/6 bundle: TTA, scales, CRF, bias and post-processing decided on out-of-fold evidence (--tune oof)"
$BIN/glacier-submit build --models "$OUT/weights/*.pt" --out "$OUT/submission" --tune oof \
    --tune-data "$OUT/synth/train" --test-tiles 9

step "6/6 evaluate the bundle as the platform runs it, on the unseen region (no member saw it)"
$BIN/glacier-submit evaluate --bundle "$OUT/submission" --data "$OUT/synth/unseen" --compare --out "$OUT/report"

echo
echo "demo finished in $(( $(date +%s) - start )) s; upload $OUT/submission/submission.zip; report: $OUT/report/report.md"
