#!/usr/bin/env bash
# Rebuild the recommended recipe.
set -euo pipefail
effideploy export llama --runtime llamacpp --quantize q8_0 --output out/recommended
