"""Chat fidelity (effideploy.eval.chat): the metrics on hand-worked examples, the packaged prompt set, chat-template
rendering, and greedy responses of tiny models through the runtime API (identical models agree, a perturbed one
does not; the dense log-likelihood equals a direct transformers computation; ONNX Runtime answers as PyTorch)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from effideploy.errors import EffideployError
from effideploy.eval.chat import (ChatResponses, chat_template_missing, compare_responses, cut_at_stop, exact_match,
                                  generate_responses, lcs_length, load_chat_prompts, render_chat, rouge_l,
                                  score_responses, stop_token_ids, token_f1)
from tests.conftest import tiny_llama

# A minimal chat template in the shape of ChatML-style ones: role header, content, end of turn; the generation
# prompt opens the assistant's turn.
TINY_CHAT_TEMPLATE = ("{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
                      "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------------------------------ metrics

def test_lcs_on_the_textbook_example():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # Cormen et al.: BCBA
    assert lcs_length("", "abc") == 0 and lcs_length("abc", "abc") == 3


def test_rouge_l_hand_worked():
    # LCS of "the cat sat on the mat" and "the cat lay on a mat" is "the cat on mat": 4 of 6 each way.
    assert rouge_l("the cat sat on the mat".split(), "the cat lay on a mat".split()) == pytest.approx(2 / 3)
    # reference a b c d e, candidate a c e: LCS 3, P = 3/3, R = 3/5, F = 2 * 1 * 0.6 / 1.6 = 0.75
    assert rouge_l(list("abcde"), list("ace")) == pytest.approx(0.75)
    assert rouge_l(list("ace"), list("abcde")) == pytest.approx(0.75)  # F is symmetric
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0 and rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([], []) == 1.0 and rouge_l([1], []) == 0.0 and rouge_l([], [1]) == 0.0


def test_token_f1_and_exact_match_hand_worked():
    # reference a a b c, candidate a b b d: overlap a (min 2, 1) + b (min 1, 2) = 2; P = R = 2/4
    assert token_f1(list("aabc"), list("abbd")) == pytest.approx(0.5)
    # reference a b c, candidate c b a: the same bag, F1 1; ROUGE-L sees the order (LCS 1)
    assert token_f1(list("abc"), list("cba")) == 1.0 and rouge_l(list("abc"), list("cba")) == pytest.approx(1 / 3)
    assert token_f1([], []) == 1.0 and token_f1([1], [2]) == 0.0
    assert exact_match([1, 2], [1, 2]) == 1.0 and exact_match([1, 2], [1]) == 0.0


def test_rouge_l_equals_rouge_score_where_installed():
    if importlib.util.find_spec("rouge_score") is None:
        pytest.skip("rouge_score is not installed: compared with the hand-worked examples only")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [("the cat sat on the mat", "the cat lay on a mat"), ("name three colours red green blue",
             "red blue and green are colours"), ("a b c d e", "a c e"), ("one two", "three four")]
    for reference, candidate in pairs:
        # rouge_score lowercases and splits on non-alphanumerics; these strings are already in that form
        expected = scorer.score(reference, candidate)["rougeL"].fmeasure
        assert rouge_l(reference.split(), candidate.split()) == pytest.approx(expected)


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7], frozenset({2})) == ([5, 6], 2)
    assert cut_at_stop([2, 7], frozenset({2, 9})) == ([], 2)
    assert cut_at_stop([5, 6], frozenset({2})) == ([5, 6], None)


# ------------------------------------------------------------------------------------------------ prompts

def test_the_packaged_prompt_set():
    prompts = load_chat_prompts()
    assert len(prompts) >= 20 and len(set(prompts)) == len(prompts) and all(p.strip() for p in prompts)
    assert prompts[0] == "Name three colours."  # the prompt of the report
    assert load_chat_prompts(3) == prompts[:3] and load_chat_prompts(0) == []
    with pytest.raises(EffideployError, match="chat-prompts must be between 0 and"):
        load_chat_prompts(len(prompts) + 1)


def test_rendering_uses_the_chat_template(chat_tokenizer, tiny_tokenizer):
    (ids,) = render_chat(chat_tokenizer, ["Name three colours."])
    assert ids == chat_tokenizer("<s>user\nName three colours.</s>\n<s>assistant\n", add_special_tokens=False)["input_ids"]
    assert ids[0] == chat_tokenizer.bos_token_id and ids.count(chat_tokenizer.eos_token_id) == 1
    assert chat_template_missing(chat_tokenizer) is None
    assert "no chat template" in chat_template_missing(tiny_tokenizer)
    with pytest.raises(EffideployError, match="no chat template"):
        render_chat(tiny_tokenizer, ["hello"])


def test_stop_tokens_come_from_the_tokenizer_and_the_config(chat_tokenizer):
    assert stop_token_ids(chat_tokenizer) == {chat_tokenizer.eos_token_id}
    assert stop_token_ids(chat_tokenizer, {"eos_token_id": [2, 7]}) == {2, 7}


# ------------------------------------------------------------------------------------------------ responses

NEW_TOKENS = 12


def _responses(runtime, tokenizer, count=6):
    prompts = load_chat_prompts(count)
    ids = render_chat(tokenizer, prompts)
    stop = stop_token_ids(tokenizer)
    return prompts, ids, generate_responses(runtime, ids, prompts, tokenizer, NEW_TOKENS, stop)


@pytest.fixture(scope="module")
def dense_runtime():
    from effideploy.runtimes.pytorch import TorchRuntime

    return TorchRuntime(model=tiny_llama(), device="cpu")


def test_identical_models_agree_exactly(dense_runtime, chat_tokenizer):
    from effideploy.runtimes.pytorch import TorchRuntime

    twin = TorchRuntime(model=tiny_llama(), device="cpu")  # same seed: the same weights, another runtime
    _, ids, dense = _responses(dense_runtime, chat_tokenizer)
    _, _, candidate = _responses(twin, chat_tokenizer)
    assert any(dense.responses) and all(len(r) <= NEW_TOKENS for r in dense.responses)
    dense.loglik = score_responses(dense_runtime, ids, dense)
    candidate.loglik = score_responses(dense_runtime, ids, candidate)
    fidelity = compare_responses(dense, candidate)
    assert fidelity.n == 6 and fidelity.exact_match == 1.0 and fidelity.rouge_l == 1.0 and fidelity.token_f1 == 1.0
    assert fidelity.loglik == pytest.approx(fidelity.loglik_dense) and fidelity.loglik_drop == pytest.approx(0.0)
    assert [item["rouge_l"] for item in fidelity.items] == [1.0] * 6


def test_a_perturbed_candidate_scores_lower(dense_runtime, chat_tokenizer):
    from effideploy.runtimes.pytorch import TorchRuntime

    model = tiny_llama()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    _, ids, dense = _responses(dense_runtime, chat_tokenizer)
    _, _, candidate = _responses(TorchRuntime(model=model, device="cpu"), chat_tokenizer)
    assert sum(map(len, dense.responses)) > 0 and sum(map(len, candidate.responses)) > 0
    dense.loglik = score_responses(dense_runtime, ids, dense)
    candidate.loglik = score_responses(dense_runtime, ids, candidate)
    fidelity = compare_responses(dense, candidate)
    assert fidelity.exact_match < 1.0 and fidelity.rouge_l < 1.0 and fidelity.token_f1 < 1.0
    # greedy responses are the dense model's most likely path step by step: another model's are less likely to it
    assert fidelity.loglik < fidelity.loglik_dense and fidelity.loglik_drop > 0


def test_dense_loglik_equals_a_direct_transformers_computation(dense_runtime, chat_tokenizer):
    _, ids, dense = _responses(dense_runtime, chat_tokenizer, count=3)
    scored = ChatResponses(prompts=dense.prompts, responses=[[17, 40, 99], [5], []], stop_tokens=[None, 2, 2],
                           texts=["", "", ""], max_new_tokens=NEW_TOKENS)
    loglik = score_responses(dense_runtime, ids, scored)
    model = dense_runtime.model
    for prompt, index in zip(ids, range(3)):
        continuation = scored.scored(index)
        sequence = torch.tensor([prompt + continuation])
        with torch.no_grad():
            logits = model(input_ids=sequence).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        positions = range(len(prompt) - 1, len(prompt) + len(continuation) - 1)
        expected = sum(float(log_probs[p, sequence[0, p + 1]]) for p in positions) / len(continuation)
        assert loglik[index] == pytest.approx(expected, abs=1e-4)
    assert scored.scored(1) == [5, 2] and scored.scored(0) == [17, 40, 99]  # the stop token is scored when generated


@pytest.mark.onnx
def test_onnx_runtime_answers_as_pytorch(tmp_path, tiny_model_dir, chat_tokenizer, dense_runtime):
    """The same measure on an ONNX export of the same weights: identical responses, the same log-likelihoods."""
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime", "onnxscript")):
        pytest.skip("needs onnx, onnxruntime and onnxscript")
    from effideploy.exporters import export
    from effideploy.runtimes import open_runtime

    export("onnx", str(tiny_model_dir), tmp_path / "onnx")
    _, ids, reference = _responses(dense_runtime, chat_tokenizer, count=4)
    reference.loglik = score_responses(dense_runtime, ids, reference)
    with open_runtime("onnx", tmp_path / "onnx") as runtime:
        _, _, onnx = _responses(runtime, chat_tokenizer, count=4)
        onnx.loglik = score_responses(runtime, ids, onnx)
    assert onnx.responses == reference.responses and onnx.stop_tokens == reference.stop_tokens
    assert onnx.loglik == pytest.approx(reference.loglik, abs=1e-3)
    assert compare_responses(reference, onnx).rouge_l == 1.0
