#!/usr/bin/env bash
# Set up (idempotent) and run every test, the slow SmolLM2 / vLLM / ONNX ones included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not smollm2 and not vllm"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export EFFIDEPLOY_PROGRESS=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# --durations: the slowest tests are named in every run, so the suite's time (kept under the README's figure) can be
# trimmed where it goes.
exec "${PYTHON:-python3}" -m pytest tests -p no:cacheprovider --durations=25 "$@"
