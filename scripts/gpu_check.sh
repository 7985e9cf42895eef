#!/usr/bin/env bash
# Every check that needs CUDA, in one short run, for a machine with one or two GPUs (a Kaggle
# T4 x2 session, or a lent GPU machine): the gpu-marked tests (AMP training, fp16 inference,
# ONNX Runtime's CUDA provider, resume on CUDA, NCCL DDP with the shipped T4 config, the AMP
# out-of-memory redo), a failing NCCL rank that must end the run at once, and the T4 timings.
# Writes its logs to ${OUT:-gpu_check}/.  Usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
    | tee "$OUT/torch.txt"
rc=0
echo "== gpu tests"
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" \
    || rc=1
echo "== a failing NCCL rank ends the run (no hang)"
"$PY" -m pytest -q tests/training/engine/test_distributed.py -k failing_rank -p no:cacheprovider 2>&1 | tee "$OUT/failing_rank.txt" \
    || rc=1
echo "== inference timings on the GPU (5 members x 8 views, 512x512)"
"$PY" benchmarks/gpu_inference.py --repeats 2 --out "$OUT/gpu_inference.json" \
    2>&1 | tee "$OUT/inference_speed.txt" || rc=1
echo "gpu_check finished with status $rc; logs in $OUT/"
exit $rc
