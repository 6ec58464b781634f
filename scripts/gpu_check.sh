#!/usr/bin/env bash
# The one prepared device run (issue #15): the GPU-marked tests, then the engine against HF generate on a GPU
# with the CUDA-graph layout. Needs only torch + transformers on the device (no download: SmolLM2-135M's
# shapes with random weights). Pilot first: `bash scripts/gpu_check.sh pilot` (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src TRANSFORMERS_VERBOSITY=error
mode=${1:-full}
python -m pytest -q -p no:cacheprovider -m gpu tests/ || echo "gpu tests failed (exit $?)"
if [ "$mode" = pilot ]; then
  python benchmarks/serve_decode.py --model smollm2-random --device cuda --batch 8 --contexts 32 --new-tokens 8 \
    --rounds 2 --compile reduce-overhead
else
  python benchmarks/serve_decode.py --model smollm2-random --device cuda --batch 32 --contexts 32 2048 \
    --new-tokens 32 --rounds 3 --compile reduce-overhead
fi
