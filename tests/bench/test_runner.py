"""How the runner turns measurements into a candidate's comparison record, on hand-made measurements."""

import math
from pathlib import Path

import pytest

from effideploy.bench.artifacts import candidate_label
from effideploy.bench.compare import Comparison, compare, pareto
from effideploy.bench.config import BenchConfig, CandidateSpec
from effideploy.bench.results import Latency, ModelResult, Parameters, Size, WeightStorage
from effideploy.errors import EffideployError
from effideploy.eval.multiple_choice import TaskResult
from effideploy.eval.perplexity import PerplexityResult

COUNTS_DENSE = {"attention": 100, "ffn": 300, "embedding": 100, "lm_head": 0, "norms": 0, "total": 500}
COUNTS_PRUNED = {"attention": 100, "ffn": 150, "embedding": 100, "lm_head": 0, "norms": 0, "total": 350}


def entry(label, *, ttft, tpot, nll, predictions, chosen, accuracy, counts, scope="full", peak=None, throughput=None,
          seqlen=None):
    model = ModelResult(label=label, kind="x", spec=label, artifact=Path("."), checkpoint=None)
    model.latency = Latency(ttft_s=ttft, tpot_s=tpot, e2e_s=[t + sum(tpot[:2]) for t in ttft], tokens=[[1, 2, 3, 4]])
    model.throughput = throughput or {}
    model.perplexity = PerplexityResult(nll=nll, predictions=predictions, scope=scope,
                                        seqlen=seqlen or len(nll[0]) + 1)
    model.tasks = {"t": TaskResult(name="t", accuracy=accuracy, chosen=chosen, correct=[], indices=[])}
    model.parameters = Parameters(counts=counts, ffn_widths=[], attention_width=2, max_positions=None)
    model.size = Size(checkpoint_weights_bytes=counts["total"] * 4, artifact_bytes=0, artifact=".", checkpoint=None)
    model.weights = WeightStorage(format="float32", stored_bytes=counts["total"] * 4,
                                  bytes_per_token=(counts["attention"] + counts["ffn"] + counts["embedding"]) * 4)
    if peak is not None:
        model.memory = {"peak_rss_mb": peak, "model_rss_mb": peak - 100}
    return model


def config(**overrides):
    return BenchConfig(candidates=(CandidateSpec(model="x"),), prompt_tokens=10, new_tokens=4, **overrides)


def test_comparison_record_from_hand_made_measurements():
    dense = entry("dense", ttft=[0.2, 0.4, 0.3], tpot=[0.05, 0.06, 0.04], nll=[[1.0, 2.0], [3.0, 3.0]],
                  predictions=[[1, 2], [3, 4]], chosen=[0, 1, 1, 0], accuracy=0.5, counts=COUNTS_DENSE, peak=600.0,
                  throughput={"1": [10.0, 12.0], "4": [40.0]})
    cand = entry("cand", ttft=[0.2, 0.1, 0.3], tpot=[0.04, 0.04, 0.05], nll=[[2.0, 2.0], [3.0, 4.0]],
                 predictions=[[1, 0], [3, 4]], chosen=[0, 1, 0, 0], accuracy=0.25, counts=COUNTS_PRUNED, peak=450.0,
                 throughput={"1": [11.0], "4": [60.0]})
    record = compare(dense, cand, config()).to_dict()
    # medians: TTFT 0.3 vs 0.2, TPOT 0.05 vs 0.04
    assert record["ttft_speedup"] == pytest.approx(1.5) and record["decode_speedup"] == pytest.approx(1.25)
    # perplexity exp(mean of window means): dense exp((1.5 + 3) / 2), candidate exp((2 + 3.5) / 2)
    assert record["perplexity_increase"] == pytest.approx(math.exp(2.75) / math.exp(2.25) - 1)
    # ratios: task 0.25 / 0.5, wikitext 1/ppl -> ppl_dense / ppl_cand
    wiki = math.exp(2.25) / math.exp(2.75)
    assert record["ratios"] == pytest.approx({"t": 0.5, "wikitext2": wiki})
    assert record["op"] == pytest.approx(math.sqrt((0.25 + wiki**2) / 2))
    assert record["accuracy_drop"] == pytest.approx(0.25)
    # loyalty: tokens 3 of 4 identical, choices 3 of 4 -> pooled 6 of 8
    assert record["loyalty_tokens"] == 0.75 and record["loyalty_choices"] == 0.75 and record["loyalty"] == 0.75
    assert record["throughput_speedups"] == pytest.approx({"1": 1.0, "4": 1.5}) and record["throughput_speedup"] == 1.5
    assert record["p99_latency_ms"] == pytest.approx(1000 * (0.298 + 0.08))
    assert record["peak_memory_mb"] == 450.0 and record["size_reduction"] == pytest.approx(0.3)
    assert record["ideal"]["decode_speedup_weight_bytes"] == pytest.approx(500 / 350)
    assert record["weight_bytes_ratio"] == pytest.approx(500 / 350)


def test_size_and_ideal_bytes_follow_the_stored_weights():
    """An int8 export of the dense model: the same parameters, a quarter of the bytes (plus scales)."""
    kwargs = dict(ttft=[0.2], tpot=[0.05], nll=[[1.0, 2.0]], predictions=[[1, 2]], chosen=[0], accuracy=0.5,
                  counts=COUNTS_DENSE)
    dense, int8 = entry("dense", **kwargs), entry("dense+int8", **kwargs)
    int8.weights = WeightStorage(format="int8 block 32", stored_bytes=500 + 64, bytes_per_token=500 + 64)
    record = compare(dense, int8, config())
    assert record.size_reduction == pytest.approx(1 - 564 / 2000) and record.weight_bytes_ratio == pytest.approx(2000 / 564)
    assert record.ideal["decode_speedup_weight_bytes"] == pytest.approx(2000 / 564)
    assert record.ideal["decode_speedup_flops"] == pytest.approx(1.0) and record.parameters_removed == 0


def test_a_compressed_candidate_is_compared_on_the_same_second_halves():
    # windows of 4 tokens: per-token NLL rows of 3; the candidate scored tokens 2..3 (NLL indices 1..2)
    dense = entry("dense", ttft=[0.1], tpot=[0.01], nll=[[9.0, 1.0, 2.0]], predictions=[[7, 5, 6]], chosen=[1],
                  accuracy=1.0, counts=COUNTS_DENSE)
    cand = entry("dense+snapkv:0.5", ttft=[0.1], tpot=[0.01], nll=[[1.0, 4.0]], predictions=[[5, 0]], chosen=[1],
                 accuracy=1.0, counts=COUNTS_DENSE, scope="second_half", seqlen=4)
    record = compare(dense, cand, config(ppl_seqlen=4)).to_dict()
    assert record["perplexity_dense"] == pytest.approx(math.exp(1.5))  # the dense NLL of the same two tokens
    assert record["perplexity_increase"] == pytest.approx(math.exp(2.5) / math.exp(1.5) - 1)
    assert record["loyalty_counts"] == {"tokens": {"identical": 1, "total": 2}, "choices": {"identical": 1, "total": 1}}


def test_a_model_against_itself_scores_one():
    make = lambda label: entry(label, ttft=[0.2, 0.3], tpot=[0.05, 0.05], nll=[[1.0, 2.0]], predictions=[[1, 2]],
                               chosen=[0, 2], accuracy=0.5, counts=COUNTS_DENSE)
    record = compare(make("dense"), make("same"), config()).to_dict()
    assert record["op"] == 1.0 and record["og"] == 0.0 and record["loyalty"] == 1.0
    assert record["perplexity_increase"] == 0.0 and record["decode_speedup"] == 1.0


def test_pareto_includes_the_dense_point():
    fronts = pareto([Comparison(candidate="fast", kind="x", op=0.9, ratios={"wikitext2": 0.8}, decode_speedup=1.4,
                                ttft_speedup=0.9, throughput_speedup=None),
                     Comparison(candidate="bad", kind="x", op=0.8, ratios={"wikitext2": 0.9}, decode_speedup=0.9,
                                ttft_speedup=0.8, throughput_speedup=None)])
    flags = lambda quality, axis: {p.model: p.non_dominated for p in fronts[quality][axis]}
    assert flags("op", "decode_speedup") == {"dense": True, "fast": True, "bad": False}
    assert flags("op", "ttft_speedup") == {"dense": True, "fast": False, "bad": False}
    assert flags("op", "throughput_speedup") == {"dense": True, "fast": False, "bad": False}  # not measured: off the front
    assert flags("perplexity_ratio", "decode_speedup") == {"dense": True, "fast": True, "bad": False}


def test_labels_come_from_provenance_and_stay_unique(tiny_pruned_dir, tiny_model_dir):
    taken = {"dense"}
    assert candidate_label(CandidateSpec(model=str(tiny_pruned_dir)), taken) == "cfsp-0.5"
    assert candidate_label(CandidateSpec(model=str(tiny_pruned_dir)), taken) == "cfsp-0.5#2"
    assert candidate_label(CandidateSpec(compression="snapkv:0.2"), taken) == "dense+snapkv:0.2"
    assert candidate_label(CandidateSpec(model=str(tiny_model_dir), label="mine"), taken) == "mine"


@pytest.mark.parametrize("amount, label", [({"target_params": 0.05}, "drop-attention-0.05"),
                                           ({"count": 1}, "drop-attention-1")])
def test_a_depth_checkpoint_is_labelled_by_its_amount(tmp_path, tiny_model_dir, calib_file, amount, label):
    """As tune names it, not by the FFN sparsity its config leaves at the default (it once read drop-attention-0.5)."""
    from effideploy.data.text import TextSpec
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint

    spec = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
    target, _ = prune_checkpoint(resolve_model(tiny_model_dir),
                                 PruneConfig(method="drop-attention", calib_samples=2, calib_seqlen=32, **amount),
                                 tmp_path / "depth", calibration=spec)
    assert candidate_label(CandidateSpec(model=str(target)), {"dense"}) == label
    from effideploy.exporters import export

    exported = tmp_path / "vllm"  # an export benched as a candidate: the label comes from its manifest
    export("vllm", resolve_model(target), exported, verify=False)
    assert candidate_label(CandidateSpec(model=str(exported)), {"dense"}) == label


@pytest.mark.parametrize("overrides, fragment", [
    ({"repeats": 0}, "repeats must be at least 1"),
    ({"new_tokens": 1}, "new_tokens must be at least 2"),
    ({"batch_sizes": (1, 0)}, "batch_sizes must be positive"),
    ({"mc_limit": -2}, "mc_limit must not be negative"),
    ({"candidates": ()}, "no candidates"),
])
def test_bad_bench_options(overrides, fragment):
    values = {"candidates": (CandidateSpec(model="x"),), **overrides}
    with pytest.raises(EffideployError, match=None) as info:
        BenchConfig(**values)
    assert fragment in str(info.value)


def test_shared_prompt_scoring_equals_scoring_whole_sequences():
    import torch

    from effideploy.runtimes.pytorch import TorchRuntime
    from tests.conftest import tiny_llama

    runtime = TorchRuntime(model=tiny_llama())
    prompt = [5, 17, 33, 2, 90, 41]
    sequences = [prompt + [7], prompt + [8, 9, 10], [3, 4] + [11, 12]]  # two share a prompt, one does not
    starts = [6, 6, 2]
    shared = runtime.score_continuations([(s[:start], s[start:]) for s, start in zip(sequences, starts)])
    for scores, whole, start in zip(shared, runtime.score_windows(sequences), starts):
        torch.testing.assert_close(scores.nll, whole.nll[start - 1 :], atol=1e-4, rtol=1e-4)
        assert torch.equal(scores.argmax, whole.argmax[start - 1 :])


def test_compression_that_keeps_everything_is_loyal_to_dense(tiny_model_dir, tiny_task_dir):
    """snapkv at budget 1.0 keeps the whole cache: its candidate must match dense on the same positions."""
    from effideploy.bench.runner import run_bench
    from tests.conftest import DATA

    config = BenchConfig(dense=str(tiny_model_dir), candidates=(CandidateSpec(compression="snapkv:1.0"),),
                         prompt_tokens=24, new_tokens=4, prompts=1, repeats=1, batch_sizes=(1,), throughput_repeats=1,
                         ppl_windows=2, ppl_seqlen=64, tasks=(str(tiny_task_dir),), memory=False, data_dir=str(DATA))
    payload = run_bench(config).to_dict()
    record = payload["comparisons"][0]
    assert record["candidate"] == "dense+snapkv:1.0" and record["perplexity_scope"] == "second_half"
    assert record["loyalty"] == 1.0 and record["generation_match"] == 1.0
    assert record["perplexity_increase"] == pytest.approx(0.0, abs=1e-4) and record["op"] == pytest.approx(1.0, abs=1e-4)
    assert payload["models"][1]["throughput"] == {}  # generate_batch takes no hooks: noted, not faked
    assert any("throughput not measured for dense+snapkv:1.0" in note for note in payload["notes"])


def test_quantize_expands_to_the_dense_model_and_each_checkpoint():
    from effideploy.bench.config import expanded_candidates

    config = BenchConfig(candidates=(CandidateSpec(model="a"), CandidateSpec(compression="snapkv:0.2")),
                         quantize=("int8", "int4"))
    assert expanded_candidates(config) == (
        CandidateSpec(model="a"), CandidateSpec(compression="snapkv:0.2"),
        CandidateSpec(quantize="int8"), CandidateSpec(model="a", quantize="int8"),
        CandidateSpec(quantize="int4"), CandidateSpec(model="a", quantize="int4"))
    taken = {"dense"}
    assert candidate_label(CandidateSpec(quantize="int8"), taken) == "dense+int8"


def test_quantize_on_a_runtime_that_reads_checkpoints_is_refused(tiny_model_dir):
    from effideploy.bench.runner import run_bench
    from tests.conftest import DATA

    config = BenchConfig(dense=str(tiny_model_dir), quantize=("int8",), memory=False, data_dir=str(DATA))
    with pytest.raises(EffideployError, match="quantized weights need an exporting runtime"):
        run_bench(config)


def test_op_and_og_leave_out_tasks_where_dense_is_at_chance():
    """Hand-made: the dense model is 0.9 on a 2-way task (competent) and 0.5 on another (chance), over 50 items;
    the candidate 0.45 and 0.9. Only the competent task and WikiText-2 enter OP, OG and the accuracy drop."""
    def model(label, competent, noise):
        result = entry(label, ttft=[0.2], tpot=[0.05], nll=[[1.0, 2.0]], predictions=[[1, 2]], chosen=[0],
                       accuracy=0.5, counts=COUNTS_DENSE)
        result.tasks = {"competent": TaskResult("competent", competent, [0] * 50, [], list(range(50)), chance=0.5),
                        "noise": TaskResult("noise", noise, [0] * 50, [], list(range(50)), chance=0.5)}
        return result

    record = compare(model("dense", 0.9, 0.5), model("cand", 0.45, 0.9), config())
    assert set(record.excluded_tasks) == {"noise"} and "chance 0.500 over 50 items" in record.excluded_tasks["noise"]
    assert record.ratios == pytest.approx({"competent": 0.5, "wikitext2": 1.0})
    assert record.op == pytest.approx(math.sqrt((0.25 + 1.0) / 2))  # with the at-chance task it would be above 1
    assert record.og == pytest.approx(100 * 0.25 / 0.75)
    assert record.accuracy_drop == pytest.approx(0.45)
