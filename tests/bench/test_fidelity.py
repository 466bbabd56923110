"""Next-token fidelity measured on the runtime (bench/fidelity.py): the top-k / support log-probabilities the
runtime adapters return against transformers' log_softmax, the KL estimator against the exact full-vocabulary KL
on tiny random models, and a bench of a model against itself and against a perturbed copy."""

from __future__ import annotations

import shutil

import pytest
import torch

from effideploy.bench.fidelity import KL_SUPPORT, TOP_K, kl_exact, kl_topk, measure, topk_overlap
from tests.conftest import DATA, WIKI_TEST, tiny_llama

SEQUENCE = [5, 17, 99, 230, 41, 8, 77, 150, 12, 3, 64, 200, 31, 300, 2, 45, 9, 180, 66, 21]


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def perturbed(model, scale: float, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


# ------------------------------------------------------------------------------------------- the estimator

@pytest.mark.parametrize("init", [0.1, 0.3])
def test_kl_estimate_is_exact_at_full_vocabulary_and_a_lower_bound_that_closes_with_k(init):
    ids = torch.randint(3, 384, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    dense = logits_of(tiny_llama(0, initializer_range=init), ids).double()
    candidate = logits_of(perturbed(tiny_llama(0, initializer_range=init), 0.02), ids).double()
    p_log, q_log = torch.log_softmax(dense, -1), torch.log_softmax(candidate, -1)
    exact = kl_exact(dense, candidate)
    assert float(exact.min()) > 0
    previous = torch.zeros_like(exact)
    for k in (1, 5, 20, 100, 200, 300, 350, 383, 384):
        top = p_log.topk(k, -1)
        estimate = kl_topk(top.values, q_log.gather(-1, top.indices))
        assert bool((estimate <= exact + 1e-12).all())  # coarsening to k + 1 outcomes never adds divergence
        assert bool((estimate >= previous - 1e-12).all())  # a finer partition: never less
        previous = estimate
        if float(top.values.exp().sum(-1).min()) >= 0.99:  # k holds most of the mass everywhere: close
            assert float(estimate.mean()) == pytest.approx(float(exact.mean()), rel=0.02)
    torch.testing.assert_close(previous, exact, atol=1e-12, rtol=0)  # k = vocabulary: the exact KL
    # float32 inputs (what the runtimes return): still equal within float32 resolution at k = vocabulary
    top = p_log.float().topk(384, -1)
    torch.testing.assert_close(kl_topk(top.values, q_log.float().gather(-1, top.indices)), exact,
                               atol=2e-5, rtol=1e-4)


def test_topk_overlap_is_the_screens_set_overlap():
    dense = torch.tensor([[1, 2, 3], [4, 5, 6]])
    candidate = torch.tensor([[3, 2, 1], [6, 7, 8]])
    assert topk_overlap(dense, candidate).tolist() == [1.0, pytest.approx(1 / 3)]


# ------------------------------------------------------------------------------------------- the adapters

def test_torch_runtime_topk_and_support_equal_transformers_log_softmax():
    from effideploy.runtimes.pytorch import TorchRuntime

    model = tiny_llama(0)
    runtime = TorchRuntime(model=model)
    expected = torch.log_softmax(logits_of(model, SEQUENCE)[:-1].float(), -1)
    support = torch.randint(0, 384, (len(SEQUENCE) - 1, 7), generator=torch.Generator().manual_seed(3))
    plain = runtime.score_windows([SEQUENCE])[0]
    assert plain.top_ids is None and plain.top_logprobs is None and plain.support_logprobs is None  # default off
    scores = runtime.score_windows([SEQUENCE], top_k=TOP_K, support=[support])[0]
    top = expected.topk(TOP_K, -1)
    assert torch.equal(scores.top_ids, top.indices)
    torch.testing.assert_close(scores.top_logprobs, top.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.support_logprobs, expected.gather(-1, support), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.nll, plain.nll) and torch.equal(scores.argmax, plain.argmax)


def test_onnx_runtime_topk_and_support_equal_transformers_log_softmax(tmp_path_factory, tiny_model_dir, calib_file):
    pytest.importorskip("onnxruntime")
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.onnx import OnnxRuntime
    from tests.exporters.test_onnx import exported

    model = load_model(resolve_model(tiny_model_dir))
    expected = torch.log_softmax(logits_of(model, SEQUENCE)[:-1].float(), -1)
    top = expected.topk(KL_SUPPORT, -1)
    with OnnxRuntime(exported("dense", tmp_path_factory, tiny_model_dir, calib_file).output, threads=1) as runtime:
        scores = runtime.score_windows([SEQUENCE], top_k=KL_SUPPORT, support=[top.indices])[0]
    assert torch.equal(scores.top_ids, top.indices)
    torch.testing.assert_close(scores.top_logprobs, top.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.support_logprobs, top.values, atol=1e-4, rtol=0)


test_onnx_runtime_topk_and_support_equal_transformers_log_softmax = pytest.mark.onnx(
    test_onnx_runtime_topk_and_support_equal_transformers_log_softmax)


# ------------------------------------------------------------------------------------------- the bench

@pytest.fixture(scope="module")
def bench_models(tmp_path_factory, tiny_model_dir):
    """(same weights as dense in another folder, a perturbed copy)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("fidelity")
    same = root / "same"
    shutil.copytree(tiny_model_dir, same)
    noisy = root / "noisy"
    perturbed(tiny_llama(0), 0.01).save_pretrained(noisy)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(noisy)
    return same, noisy


@pytest.mark.skipif(not WIKI_TEST.exists(), reason="WikiText-2 test text not in the shared data")
def test_bench_measures_kl_and_topk_on_the_runtime(tmp_path, tiny_model_dir, bench_models):
    from effideploy.bench.config import BenchConfig, CandidateSpec
    from effideploy.bench.report import markdown
    from effideploy.bench.runner import run_bench
    from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.models.resolve import resolve_model

    same, noisy = bench_models
    config = BenchConfig(runtime="torch", dense=str(tiny_model_dir),
                         candidates=(CandidateSpec(model=str(same)), CandidateSpec(model=str(noisy))),
                         prompt_tokens=8, new_tokens=2, prompts=1, warmup=0, repeats=1, batch_sizes=(),
                         throughput_repeats=0, ppl_windows=3, ppl_seqlen=48, mc_limit=0, memory=False, threads=1,
                         data_dir=str(DATA), export_root=str(tmp_path / "exports"))
    report = run_bench(config)
    itself, other = report.comparisons
    assert itself.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert itself.top_k_agreement == 1.0 and itself.top1_agreement == 1.0 and itself.fidelity_top_k == TOP_K
    assert itself.fidelity_positions == 3 * 47 and itself.fidelity_kl_support == KL_SUPPORT
    assert "torch runtime artifact, WikiText-2 test windows 1..3 (3 x 48 tokens" in itself.fidelity_source
    assert itself.kl_divergence_predicted is None  # a plain bench: no screen
    assert other.top1_agreement == pytest.approx(other.loyalty_tokens)

    # independently from transformers' logits on the same text: dense's top-20 support plus the tail bucket
    tokenizer = load_tokenizer(resolve_model(str(tiny_model_dir)))
    windows = consecutive_windows(tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "test", str(DATA)))),
                                  48, 3).tolist()
    dense_model, noisy_model = load_model(resolve_model(str(tiny_model_dir))), load_model(resolve_model(str(noisy)))
    kl, overlap, exact = [], [], []
    for window in windows:
        p_log = torch.log_softmax(logits_of(dense_model, window)[:-1].double(), -1)
        q_log = torch.log_softmax(logits_of(noisy_model, window)[:-1].double(), -1)
        support = p_log.topk(KL_SUPPORT, -1).indices
        p, q = p_log.exp().gather(-1, support), q_log.exp().gather(-1, support)
        p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
        kl += ((p * (p.log() - q.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())).tolist()
        exact += (p_log.exp() * (p_log - q_log)).sum(-1).tolist()
        dense_top, noisy_top = p_log.topk(TOP_K, -1).indices, q_log.topk(TOP_K, -1).indices
        overlap += ((dense_top[:, :, None] == noisy_top[:, None, :]).any(-1).double().mean(-1)).tolist()
    assert other.kl_divergence > 0.01
    assert other.kl_divergence == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    assert other.kl_divergence <= sum(exact) / len(exact)
    assert other.top_k_agreement == pytest.approx(sum(overlap) / len(overlap), abs=1e-9)
    assert other.kl_divergence_stderr > 0

    text = markdown(report)
    assert "## Next-token fidelity (measured on the runtime)" in text and "predicted (screen)" not in text
    models = {m.label: m for m in report.models}
    assert models[other.candidate].to_dict()["fidelity"]["kl"] == other.kl_divergence
