"""Integration: prune the real SmolLM2-135M through the CLI with a small calibration set."""

import json
import subprocess
import sys

import pytest
import torch

from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
from effideploy.eval.perplexity import perplexity
from effideploy.models.build import count_parameters, ffn_widths, load_model, load_tokenizer
from effideploy.models.resolve import resolve_model

pytestmark = pytest.mark.smollm2

# Loads the checkpoint the way a user without effideploy would (effideploy imports are made to fail).
PLAIN_LOAD = """
import sys, json, torch
sys.modules["effideploy"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    print(json.dumps(model(ids).logits[0, -1].tolist()))
"""


def test_prune_smollm2_with_the_cli(tmp_path):
    out = tmp_path / "pruned"
    done = subprocess.run([sys.executable, "-m", "effideploy", "prune", "--model", "llama", "--sparsity", "0.5",
                           "--calib-samples", "8", "--calib-seqlen", "256", "--output", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "effideploy.json").read_text())

    dense_source, pruned_source = resolve_model("llama"), resolve_model(out)
    dense, pruned = load_model(dense_source), load_model(pruned_source)
    widths = ffn_widths(pruned.config)
    assert len(widths) == 30 and sum(widths) == pytest.approx(0.5 * 30 * 1536, abs=30)
    assert min(widths) < max(widths) <= 1536  # CFSP's per-block budgets differ
    assert record["sparsity"]["ffn_actual"] == pytest.approx(0.5, abs=1e-3)
    # 30 blocks x 3 x 576 x 768 FFN weights removed out of SmolLM2's 134.5M parameters.
    removed = 1 - count_parameters(pruned.config)["total"] / count_parameters(dense.config)["total"]
    assert removed == pytest.approx(record["sparsity"]["parameters_removed"]) and 0.28 < removed < 0.31
    assert sum(p.numel() for p in pruned.parameters()) < 0.72 * sum(p.numel() for p in dense.parameters())
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk < 0.75 * sum(f.stat().st_size for f in dense_source.path.glob("*.safetensors"))

    # Worse than dense, far from broken: two windows of WikiText-2 test (dense ~20-25 there).
    ids = tokenize_text(load_tokenizer(dense_source), load_text(resolve_text("wikitext2", "test")))
    windows = consecutive_windows(ids, 1024, 2)
    with torch.no_grad():
        dense_ppl, pruned_ppl = perplexity(dense, windows).perplexity, perplexity(pruned, windows).perplexity
    assert dense_ppl < pruned_ppl < 4 * dense_ppl

    # Plain transformers (no effideploy importable) gives the in-memory logits.
    prompt = windows[0, :32].tolist()
    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(prompt)],
                           capture_output=True, text=True, check=True)
    with torch.no_grad():
        expected = pruned(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(torch.tensor(json.loads(plain.stdout.splitlines()[-1])), expected, rtol=1e-4, atol=1e-4)
