#!/usr/bin/env bash
# The exports served (vLLM; the CFSP 10% checkpoint with the default pruning options):
set -euo pipefail
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
effideploy export llama --runtime vllm --output dense-vllm
effideploy export llama --runtime vllm --quantize w8a8 --output dense-w8a8
effideploy prune --model llama --method cfsp --sparsity 0.1 --calib-samples 32 --calib-seqlen 512 \
    --data-dir ../shared/data --output cfsp-0.1
effideploy export cfsp-0.1 --runtime vllm --quantize w8a8 --output cfsp-0.1-w8a8
# The serving bench (2026-12-08 01:47-02:30 UTC, 2578 s, 2-core AMD EPYC with AVX2 only, nothing else running;
# the exports and the pruning before it 01:43-01:47):
effideploy bench --runtime vllm --serve --model dense-vllm --candidate dense-w8a8 --candidate cfsp-0.1-w8a8 \
    --threads 1 --policy policy.toml --data-dir ../shared/data --output serve-vllm-repeats
