#!/usr/bin/env bash
# The platform's environment (Python 3.9, torch 2.0.1, no smp/scipy/onnx) in .venv39,
# used by the tests marked `compat`. About a minute and 4-5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY39="${PY39:-/root/.pyenv/versions/3.9.18/bin/python}"
if [[ -x .venv39/bin/python ]] && .venv39/bin/python -c "import torch, tifffile, cv2" 2>/dev/null; then
  exit 0
fi
if [[ ! -x "$PY39" ]]; then
  echo "Python 3.9 not found at $PY39; set PY39=/path/to/python3.9" >&2
  exit 1
fi
"$PY39" -m venv .venv39
.venv39/bin/pip install -q torch==2.0.1 torchvision==0.15.2 "numpy<2" tifffile opencv-python-headless pillow tqdm scikit-learn
