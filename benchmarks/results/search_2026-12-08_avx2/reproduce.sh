#!/usr/bin/env bash
# Rebuild the recommended recipe.
set -euo pipefail
effideploy prune --model llama --method cfsp --sparsity 0.1 --align 32 --calib-samples 32 --calib-seqlen 512 --output out/recommended-checkpoint
effideploy export out/recommended-checkpoint --runtime onnx --quantize int8 --output out/recommended
