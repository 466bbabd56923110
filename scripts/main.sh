#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the embedded default model: prune SmolLM2-135M with CFSP at FFN
# sparsity 0.2 and 0.5 (one calibration pass), export the dense model and both checkpoints to ONNX, bench all three
# on ONNX Runtime and write the sign-off report to out/run/report/ (report.md, report.json, PNG plots).
#
# Cost, measured on a shared 2-core CPU (load average 3-5) with these defaults: ~29 min the first time
# (calibration 17 min, pruning 13 s, ONNX export 2 min, bench 10 min); a second run reuses the checkpoints and
# exports and only re-measures (~10 min). `--quick` is a smoke run (16 x 512 calibration, fewer repeats/examples).
#
# Extra arguments go to `effideploy run` and win over the defaults below (see `effideploy run --help`), e.g.
#   bash scripts/main.sh --runtime torch          # no export: PyTorch eager
#   bash scripts/main.sh --runtime vllm           # vLLM (CPU build) export and engine
#   bash scripts/main.sh --threads 8 --policy bench/policies/default.toml   # exit 1 when the policy fails
# --threads 1 is the default here: on a small or busy machine one thread per model is steadier and rarely slower.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec effideploy run --runtime onnx --threads 1 "$@"
