#!/usr/bin/env bash
# The exports served (llama.cpp GGUFs; the CFSP 20% checkpoint is tune's, widths aligned to 256 for q4_k_m):
effideploy export llama --runtime llamacpp --output dense-f16
effideploy export llama --runtime llamacpp --quantize q8_0 --output dense-q8_0
effideploy export llama --runtime llamacpp --quantize q4_k_m --output dense-q4_k_m
effideploy prune --model llama --method cfsp --sparsity 0.2 --align 256 --calib-samples 32 --calib-seqlen 512 \
    --data-dir ../shared/data --output cfsp-0.2-align256
effideploy export cfsp-0.2-align256 --runtime llamacpp --quantize q4_k_m --output cfsp-0.2-q4_k_m
# The serving bench (2026-12-03 21:02-21:27 UTC, 1471 s, 2-core AMD EPYC with AVX-512, nothing else running):
effideploy bench --runtime llamacpp --serve --model dense-f16 --candidate dense-q8_0 --candidate dense-q4_k_m \
    --candidate cfsp-0.2-q4_k_m --threads 1 --policy policy.toml --data-dir ../shared/data --output serve-llamacpp
