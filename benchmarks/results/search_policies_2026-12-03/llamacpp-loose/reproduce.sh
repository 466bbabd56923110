#!/usr/bin/env bash
# Rebuild the recommended recipe.
set -euo pipefail
effideploy prune --model llama --method cfsp --sparsity 0.2 --align 256 --calib-samples 32 --calib-seqlen 512 --data-dir /work/shared/data --output out/recommended-checkpoint
effideploy export out/recommended-checkpoint --runtime llamacpp --quantize q4_k_m --output out/recommended
