"""The bench on llama.cpp: checkpoints exported to GGUF on the fly (f16, and q8_0 through --quantize), opened side by
side in one process, memory of each in a fresh process."""

import pytest

from effideploy.bench.config import BenchConfig, CandidateSpec
from effideploy.bench.runner import run_bench
from effideploy.runtimes.llamacpp import llamacpp_unavailable
from tests.conftest import DATA

pytestmark = [pytest.mark.llamacpp,
              pytest.mark.skipif(llamacpp_unavailable() is not None, reason=str(llamacpp_unavailable()))]


def test_llamacpp_bench_of_a_model_against_itself_its_pruned_copy_and_q8_0(tmp_path, tiny_model_dir, tiny_pruned_dir,
                                                                          tiny_task_dir):
    config = BenchConfig(runtime="llamacpp", dense=str(tiny_model_dir),
                         candidates=(CandidateSpec(model=str(tiny_model_dir), label="same"),
                                     CandidateSpec(model=str(tiny_pruned_dir))),
                         quantize=("q8_0",), prompt_tokens=24, new_tokens=4, prompts=2, repeats=2, batch_sizes=(1, 3),
                         throughput_repeats=1, ppl_windows=2, ppl_seqlen=64, tasks=(str(tiny_task_dir),),
                         data_dir=str(DATA), export_root=str(tmp_path / "exports"), threads=2)
    payload = run_bench(config).to_dict()
    assert payload["runtime"]["runtime"] == "llamacpp" and payload["runtime"]["threads"] == 2
    by_label = {c["candidate"]: c for c in payload["comparisons"]}
    assert {"same", "cfsp-0.5", "dense+q8_0", "cfsp-0.5+q8_0"} <= set(by_label) and len(by_label) == 5
    same, pruned, dense_q8, pruned_q8 = (by_label[k] for k in ("same", "cfsp-0.5", "dense+q8_0", "cfsp-0.5+q8_0"))
    assert same["loyalty"] == 1.0 and same["perplexity_increase"] == pytest.approx(0.0, abs=1e-6)
    assert pruned["size_reduction"] > 0
    # next-token fidelity measured on the runtime's artifacts (bench/fidelity.py)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-5) and same["top_k_agreement"] == 1.0
    assert pruned["kl_divergence"] > 0 and pruned["top_k_agreement"] < 1
    assert same["fidelity_source"].startswith(payload["runtime"]["runtime"] + " runtime artifact")
    # q8_0 stores ~8.5 bits a weight against f16's 16
    assert dense_q8["size_reduction"] > 0.3 and pruned_q8["size_reduction"] > dense_q8["size_reduction"]
    assert dense_q8["loyalty"] > 0.8
    for model in payload["models"]:
        assert set(model["throughput"]) == {"1", "3"}
