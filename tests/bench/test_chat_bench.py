"""``effideploy bench --chat-prompts N`` on tiny models: the chat fidelity fields of each comparison, the report's
section, the policy thresholds on them, and the refusals of a bad option or a model without a chat template."""

import json
import shutil

import pytest

from effideploy.bench.compare import Comparison
from effideploy.bench.policy import evaluate, policy_from_dict
from tests.bench.conftest import TINY_BENCH_ARGS
from tests.conftest import DATA
from tests.eval.test_chat import TINY_CHAT_TEMPLATE
from tests.test_cli import assert_one_line_error, run_cli

CHAT_ARGS = ["--chat-prompts", "4", "--chat-new-tokens", "8", "--no-memory", "--mc-limit", "0"]
# After TINY_BENCH_ARGS (the last value of an option wins): only what the chat measure needs, to keep it short.
LEAN_ARGS = ["--ppl-windows", "0", "--repeats", "1", "--throughput-repeats", "0", "--batch-sizes", ""]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """The tiny dense model with a chat template in its tokenizer."""
    import copy

    folder = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_bench(tmp_path_factory, chat_model_dir, tiny_pruned_dir):
    """dense vs (itself, its pruned copy), gated on chat ROUGE-L: only the self-candidate can pass."""
    folder = tmp_path_factory.mktemp("chat-bench")
    policy = folder / "chat.toml"
    policy.write_text('require = "any"\n[thresholds]\nmin_chat_rouge_l = 0.999\nmax_chat_loglik_drop = 0.001\n')
    code, out, err = run_cli("bench", "--model", chat_model_dir, "--candidate", chat_model_dir, "--candidate",
                             tiny_pruned_dir, "--output", folder / "report", "--policy", policy, *TINY_BENCH_ARGS,
                             *CHAT_ARGS, *LEAN_ARGS)
    return code, out + err, folder / "report"


def test_bench_measures_chat_fidelity(chat_bench):
    code, log, report = chat_bench
    assert code == 0, log
    payload = json.loads((report / "report.json").read_text())
    same, pruned = payload["comparisons"]
    assert same["chat_prompts"] == 4 and same["chat_exact_match"] == 1.0 and same["chat_rouge_l"] == 1.0
    assert same["chat_token_f1"] == 1.0 and same["chat_loglik_drop"] == pytest.approx(0.0, abs=1e-6)
    assert pruned["chat_rouge_l"] < 1.0 and pruned["chat_loglik"] < pruned["chat_loglik_dense"]
    assert len(pruned["chat_items"]) == 4 and {"rouge_l", "token_f1", "exact_match", "loglik"} <= set(pruned["chat_items"][0])
    dense_chat = payload["models"][0]["chat"]
    assert len(dense_chat["responses"]) == 4 and dense_chat["prompts"][0] == "Name three colours."
    assert all(len(r) <= 8 for r in dense_chat["responses"]) and len(dense_chat["loglik"]) == 4
    assert payload["data"]["chat_prompts"]["prompts"] == 4 and "chat" in payload["phase_seconds"]
    assert payload["config"]["chat_prompts"] == 4
    text = (report / "report.md").read_text()
    assert "## Chat (greedy responses through the chat template: 4 prompt(s), at most 8 new tokens)" in text
    assert "the response least like dense's" in text and "> dense: " in text
    assert "every response identical to dense's" in text  # the self-candidate
    assert "chat ROUGE-L" in text  # in the verdict lines


def test_the_chat_thresholds_gate_and_name_themselves(chat_bench):
    code, log, report = chat_bench
    policy = json.loads((report / "report.json").read_text())["policy"]
    assert list(policy["candidates"].values()) == [True, False]
    failed = {c["threshold"] for c in policy["checks"] if not c["passed"]}
    assert failed == {"min_chat_rouge_l", "max_chat_loglik_drop"}
    assert "min_chat_rouge_l" in log


def test_a_chat_threshold_without_the_measure_fails_as_not_measured():
    policy = policy_from_dict({"thresholds": {"min_chat_rouge_l": 0.5}})
    (check,) = evaluate(policy, [Comparison(candidate="c", kind="checkpoint")])
    assert check.name == "min_chat_rouge_l" and check.value is None and not check.passed
    (check,) = evaluate(policy, [Comparison(candidate="c", kind="checkpoint", chat_rouge_l=0.4)])
    assert check.value == 0.4 and not check.passed


def test_a_model_without_a_chat_template_is_noted_not_measured(tiny_model_dir):
    from effideploy.bench.config import BenchConfig, CandidateSpec
    from effideploy.bench.runner import run_bench

    config = BenchConfig(dense=str(tiny_model_dir), candidates=(CandidateSpec(model=str(tiny_model_dir)),),
                         prompt_tokens=16, new_tokens=2, prompts=1, warmup=0, repeats=1, batch_sizes=(),
                         throughput_repeats=0, ppl_windows=0, mc_limit=0, memory=False, chat_prompts=2,
                         data_dir=str(DATA))
    report = run_bench(config)
    assert report.comparisons[0].chat_rouge_l is None and report.models[0].chat is None
    assert any(note.startswith("chat fidelity not measured: the tokenizer has no chat template") for note in report.notes)


def test_bad_chat_prompts_are_refused(tmp_path, tiny_model_dir):
    from effideploy.bench.config import BenchConfig, CandidateSpec
    from effideploy.errors import OptionError

    code, _, err = run_cli("bench", "--model", tiny_model_dir, "--candidate", tiny_model_dir, "--output",
                           tmp_path / "r", "--chat-prompts", "-1", *TINY_BENCH_ARGS)
    assert_one_line_error(code, err, "--chat-prompts must not be negative")
    assert not (tmp_path / "r").exists()
    with pytest.raises(OptionError, match="chat_prompts must be at most 24"):
        BenchConfig(candidates=(CandidateSpec(),), chat_prompts=1000)
    with pytest.raises(OptionError, match="chat_new_tokens must be at least 1"):
        BenchConfig(candidates=(CandidateSpec(),), chat_new_tokens=0)
