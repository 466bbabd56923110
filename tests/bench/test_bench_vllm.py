"""The bench on vLLM: checkpoints exported on the fly, two in-process engines interleaved, memory of each in a fresh
process."""

import pytest

from effideploy.bench.config import BenchConfig, CandidateSpec
from effideploy.bench.runner import run_bench
from tests.conftest import DATA

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")


def test_vllm_bench_of_a_model_against_itself_and_its_pruned_copy(tmp_path, tiny_model_dir, tiny_pruned_dir, tiny_task_dir,
                                                                  vllm_exports_without_parity):
    config = BenchConfig(runtime="vllm", dense=str(tiny_model_dir),
                         candidates=(CandidateSpec(model=str(tiny_model_dir), label="same"),
                                     CandidateSpec(model=str(tiny_pruned_dir))),
                         prompt_tokens=24, new_tokens=4, prompts=2, repeats=2, batch_sizes=(1, 3), throughput_repeats=1,
                         ppl_windows=2, ppl_seqlen=64, tasks=(str(tiny_task_dir),), data_dir=str(DATA),
                         export_root=str(tmp_path / "exports"))
    payload = run_bench(config).to_dict()
    assert payload["runtime"]["runtime"] == "vllm" and payload["runtime_options"]["max_model_len"] == 512
    same, pruned = payload["comparisons"]
    assert same["loyalty"] == 1.0 and same["op"] == pytest.approx(1.0) and same["perplexity_increase"] == pytest.approx(0.0, abs=1e-6)
    assert pruned["size_reduction"] > 0
    # next-token fidelity measured on the runtime's artifacts (bench/fidelity.py)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-5) and same["top_k_agreement"] == 1.0
    assert pruned["kl_divergence"] > 0 and pruned["top_k_agreement"] < 1
    assert same["fidelity_source"].startswith(payload["runtime"]["runtime"] + " runtime artifact")
    for model in payload["models"]:
        assert set(model["throughput"]) == {"1", "3"} and model["memory"]["peak_rss_mb"] > model["memory"]["baseline_rss_mb"]
    # exported here, once per distinct checkpoint: "same" is dense's content, so it reuses dense's export
    exports = [model["export"] for model in payload["models"]]
    assert [e["reused"] for e in exports] == [False, True, False] and exports[0]["path"] == exports[1]["path"]
