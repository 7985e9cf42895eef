#!/usr/bin/env bash
# Create .venv and install the project with every extra. Idempotent: a venv whose
# install stamp matches pyproject.toml is reused.
#
# Torch is installed first and pinned: torch 2.14.1 + torchvision 0.29.1 come from this
# machine's local disk (an unpinned install can pull a multi-GB CUDA build from PyPI, and
# PyPI's torchvision does not import beside the local torch 2.13.0). Override with
# TORCH_SPEC="torch==X torchvision==Y" on other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
STAMP="$VENV/.glacier-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi
start=$(date +%s)
echo "[setup] creating $VENV with $($PY --version)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "[setup] installing $TORCH_SPEC"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
echo "[setup] installing glacier-submit[all] (editable)"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q -e ".[all]" $TORCH_SPEC
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s"
