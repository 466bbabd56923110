#!/usr/bin/env bash
# CI: effideploy as a user gets it from `pip install`, not from the checkout. Builds the wheel from the tree,
# installs it (--no-deps) into a fresh virtual environment that sees the system site-packages (torch, transformers,
# onnx... are not installed again), and from a folder outside the source tree runs `effideploy --help`,
# `effideploy tune --help`, the packaged default policy, and a tiny prune + export. A package or data file the
# wheel lacks (issue 21: effideploy.search and effideploy.quantization were missing) fails here, where an editable
# install would not notice. About a minute on the 2-core machine. Exit status: 0 pass, non-zero fail.
#
# The checkout is also installed, editable, in the system site-packages (scripts/setup.sh): the venv's own copy
# must win, and the script asserts that every module it imports comes from the venv, not from the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd -P)
PY=${PYTHON:-python3}
RUNTIME=${EFFIDEPLOY_WHEEL_RUNTIME:-onnx}  # the tiny export's runtime
unset PYTHONPATH  # nothing may put the source tree on the path behind the script's back

TMP=$(mktemp -d "${TMPDIR:-/tmp}/effideploy-wheel.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
step() { printf '[ci_wheel %3ds] %s\n' "$SECONDS" "$*"; }

# 1. The wheel, built from a copy of what git would carry (tracked and not ignored): an in-place build would reuse
#    build/lib, where modules deleted from the tree survive and would hide a packaging error.
step "building the wheel"
mkdir -p "$TMP/src" "$TMP/dist"
inputs=(pyproject.toml setup.py README.md effideploy exporters runtimes bench)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard -- "${inputs[@]}" \
    | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$TMP/src"
else
  tar --exclude=__pycache__ -cf - "${inputs[@]}" | tar -xf - -C "$TMP/src"
fi
# --no-build-isolation: the installed setuptools builds it, so no index is needed (CI machines may be offline).
"$PY" -m pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation -w "$TMP/dist" "$TMP/src"
wheel=$(ls "$TMP"/dist/effideploy-*.whl)

# 2. A fresh venv over the system site-packages, the wheel installed into it without dependencies.
step "installing $(basename "$wheel") into a fresh venv"
"$PY" -m venv --system-site-packages "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install --disable-pip-version-check -q --no-deps --no-index "$wheel"
export PATH="$TMP/venv/bin:$PATH"
[ "$(command -v effideploy)" = "$TMP/venv/bin/effideploy" ] || { echo "ci_wheel: effideploy is not the venv's script" >&2; exit 1; }

# 3. Everything below runs from a folder outside the source tree.
mkdir "$TMP/work"
cd "$TMP/work"
export EFFIDEPLOY_PROGRESS=0 EFFIDEPLOY_CACHE="$TMP/cache"

step "the installed package: every package of the tree, from the venv, with its data"
"$VPY" - "$SRC" "$TMP/venv" <<'PYCODE'
import importlib, os, sys
from pathlib import Path

src, venv = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
roots = {"effideploy": "effideploy", "exporters": "effideploy.exporters", "runtimes": "effideploy.runtimes",
         "bench": "effideploy.bench"}
# Every folder of the tree that is a package must be importable from the venv. Importing a package runs only its
# __init__ (light by design: heavy dependencies are imported lazily), so this stays fast.
names = sorted(
    ".".join([package, *folder.relative_to(src / root).parts])
    for root, package in roots.items() for folder in [src / root, *(src / root).rglob("*")]
    if folder.is_dir() and (folder / "__init__.py").is_file())
wrong = []
for name in names:
    module = importlib.import_module(name)
    where = Path(module.__file__).resolve()
    if not where.is_relative_to(venv) or where.is_relative_to(src):
        wrong.append(f"{name}: {where}")
if wrong:
    sys.exit("ci_wheel: modules imported from outside the venv (the source tree won):\n  " + "\n  ".join(wrong))
print(f"  {len(names)} packages import from {venv}")

from effideploy.bench.policy import load_policy, packaged_policies  # package data, through importlib.resources
policy = load_policy("default")
assert Path(policy.path).resolve().is_relative_to(venv), policy.path
assert policy.name == "default" and policy.thresholds, policy
assert set(packaged_policies()) == {p.stem for p in (src / "bench" / "policies").glob("*.toml")}, packaged_policies()
from effideploy.checkpoint.config import REMOTE_FILES
remote = Path(importlib.import_module("effideploy.checkpoint.remote").__file__).parent
missing = [name for name in REMOTE_FILES if not (remote / name).is_file()]
assert not missing, f"remote code files missing from the wheel: {missing}"
print(f"  policy default: {policy.path}")
PYCODE

step "effideploy --help, effideploy tune --help"
effideploy --help >help.txt
for command in prune export bench tune run; do grep -q "$command" help.txt || { echo "ci_wheel: --help lacks $command" >&2; exit 1; }; done
effideploy tune --help >tune-help.txt
grep -q -- "--policy" tune-help.txt || { echo "ci_wheel: tune --help lacks --policy" >&2; exit 1; }

step "a tiny random Llama and calibration text"
# As tests/conftest.py makes it: head_dim 64, a byte-level BPE tokenizer trained on the spot, random init.
"$VPY" - <<'PYCODE'
import random
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

random.seed(0)
words = "the quick brown fox jumps over a lazy dog while seven small cats sleep near warm water".split()
text = "\n".join(" ".join(random.choice(words) for _ in range(40)) for _ in range(400))
open("calib.txt", "w").write(text)
tokenizer = Tokenizer(models.BPE(unk_token=None))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
tokenizer.train_from_iterator([text], trainers.BpeTrainer(
    vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False))
torch.manual_seed(0)
config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.1,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
LlamaForCausalLM(config).eval().save_pretrained("tiny")
PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained("tiny")
PYCODE

step "effideploy prune (tiny)"
effideploy prune --model tiny --sparsity 0.5 --calib calib.txt --calib-samples 4 --calib-seqlen 64 --output pruned \
  --device cpu --threads 1
[ -f pruned/config.json ] || { echo "ci_wheel: prune wrote no checkpoint" >&2; exit 1; }

step "effideploy export --runtime $RUNTIME (tiny)"
effideploy export pruned --runtime "$RUNTIME" --no-verify --output export --threads 1
[ -f export/effideploy_export.json ] || { echo "ci_wheel: export wrote no manifest" >&2; ls export >&2; exit 1; }

step "pass: the wheel installs and runs outside the source tree"
