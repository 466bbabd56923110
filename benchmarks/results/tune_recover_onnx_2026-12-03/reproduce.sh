#!/usr/bin/env bash
# Rebuild the recommended recipe.
set -euo pipefail
effideploy export llama --runtime onnx --quantize int8 --output out/recommended
