"""Integration: depth, attention and joint pruning of the real SmolLM2-135M from one small calibration pass."""

import json
import subprocess
import sys

import pytest
import torch

from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
from effideploy.eval.perplexity import perplexity
from effideploy.models.build import count_parameters, load_model, load_tokenizer
from effideploy.models.resolve import resolve_model
from effideploy.pruning import PruneConfig, calibrate_source, prune_checkpoint
from tests.pruning.test_smollm2 import PLAIN_LOAD

pytestmark = pytest.mark.smollm2

CALIB = dict(calib_samples=8, calib_seqlen=256)
CFSP_20_REMOVES = 0.118  # parameters CFSP at 20% FFN sparsity removes from SmolLM2


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth-smollm2")
    source, text = resolve_model("llama"), resolve_text("wikitext2", "calibration")
    stats = calibrate_source(source, PruneConfig(**CALIB), text, gram=True, gram_dir=str(root))
    out = {}
    for name, config in {"drop-blocks": PruneConfig(method="drop-blocks", count=2, **CALIB),
                         "drop-attention": PruneConfig(method="drop-attention", count=6, **CALIB),
                         "cfsp-joint": PruneConfig(method="cfsp-joint", target_params=CFSP_20_REMOVES, **CALIB)}.items():
        out[name] = prune_checkpoint(source, config, root / name, calibration=text, stats=stats)[0]
    return out


@pytest.fixture(scope="module")
def windows():
    ids = tokenize_text(load_tokenizer(resolve_model("llama")), load_text(resolve_text("wikitext2", "test")))
    return consecutive_windows(ids, 1024, 2)


def test_depth_pruned_smollm2_loads_in_plain_transformers_and_stays_usable(pruned, windows):
    dense = load_model(resolve_model("llama"))
    with torch.no_grad():
        dense_ppl = perplexity(dense, windows).perplexity
    for name, folder in pruned.items():
        record = json.loads((folder / "effideploy.json").read_text())
        model = load_model(resolve_model(folder))
        config = json.loads((folder / "config.json").read_text())
        if name == "drop-blocks":
            assert config["num_hidden_layers"] == 28 and len(record["structure"]["dropped_blocks"]) == 2
        if name == "drop-attention":
            assert sum(b["attention"]["no_op"] for b in config["block_configs"]) == 6
            assert not config["block_configs"][0]["attention"]["no_op"]
        with torch.no_grad():
            ppl = perplexity(model, windows).perplexity
        assert dense_ppl < ppl < 6 * dense_ppl, (name, ppl, dense_ppl)
        # plain transformers (effideploy not importable) computes the same logits
        prompt = windows[0, :32].tolist()
        plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), json.dumps(prompt)],
                               capture_output=True, text=True, check=True)
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(torch.tensor(json.loads(plain.stdout.splitlines()[-1])), expected,
                                   rtol=1e-4, atol=1e-4)


def test_joint_meets_the_parameter_target_within_one_block(pruned):
    dense = count_parameters(load_model(resolve_model("llama")).config)
    record = json.loads((pruned["cfsp-joint"] / "effideploy.json").read_text())
    one_block = (dense["attention"] + dense["ffn"] + dense["norms"]) / 30 / dense["total"]
    assert CFSP_20_REMOVES - 0.002 <= record["sparsity"]["parameters_removed"] <= CFSP_20_REMOVES + one_block
