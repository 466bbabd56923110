"""BIG-bench multiple choice: prompt format, deterministic subsets, choice tokens and the scoring arithmetic."""

import json

import pytest
import torch

from effideploy.errors import EffideployError
from effideploy.eval.multiple_choice import (
    Example,
    choice_log_probs,
    choice_sequences,
    evaluate_task,
    find_tasks,
    load_task,
    select_examples,
)
from effideploy.runtimes.base import TokenScores
from tests.conftest import DATA


def write_task(folder, payload):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(payload))
    return folder


def test_prompt_uses_bigbench_defaults_and_appends_choices(tmp_path):
    write_task(tmp_path / "t", {"examples": [{"input": "Is ice cold?", "target_scores": {"Yes": 1, "No": 0}}]})
    task = load_task(tmp_path / "t")
    example = task.examples[0]
    assert task.name == "t"
    assert example.prompt == "\nQ: Is ice cold?\n  choice: Yes\n  choice: No\nA: "
    assert example.choices == ("Yes", "No") and example.target_scores == (1.0, 0.0)


def test_prompt_uses_the_task_prefixes(tmp_path):
    write_task(tmp_path / "t", {
        "name": "sports", "task_prefix": "Decide:", "example_input_prefix": "\nStatement: ",
        "example_output_prefix": "\nPlausible/implausible? ", "append_choices_to_input": False,
        "examples": [{"input": "He scored.", "target_scores": {"plausible": 1, "implausible": 0}},
                     {"input": "generative only", "target": "x"}],
    })
    task = load_task(tmp_path / "t" / "task.json")
    assert task.name == "sports" and len(task.examples) == 1  # the example without target_scores is skipped
    assert task.examples[0].prompt == "Decide:\nStatement: He scored.\nPlausible/implausible? "


@pytest.mark.parametrize("payload, fragment", [
    ({"no": "examples"}, "needs an \"examples\" list"),
    ({"examples": [{"input": "a", "target": "b"}]}, "no multiple-choice examples"),
    ({"examples": [{"input": "a", "target_scores": {"x": "high"}}]}, "non-numeric target_scores"),
])
def test_bad_tasks_are_one_line_errors(tmp_path, payload, fragment):
    write_task(tmp_path / "t", payload)
    with pytest.raises(EffideployError) as info:
        load_task(tmp_path / "t")
    assert fragment in str(info.value)


def test_missing_and_unreadable_tasks(tmp_path):
    with pytest.raises(EffideployError, match="not found"):
        load_task(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(EffideployError, match="not valid JSON"):
        load_task(tmp_path / "bad.json")


def test_find_tasks_accepts_files_task_folders_and_folders_of_tasks(tmp_path):
    a = write_task(tmp_path / "suite" / "a", {"examples": []})
    b = write_task(tmp_path / "suite" / "b", {"examples": []})
    assert find_tasks([tmp_path / "suite"]) == [a / "task.json", b / "task.json"]
    assert find_tasks([a, b / "task.json"]) == [a / "task.json", b / "task.json"]
    with pytest.raises(EffideployError, match="holds no task.json"):
        find_tasks([tmp_path])


@pytest.mark.skipif(not (DATA / "bigbench").is_dir(), reason="shared BIG-bench data not present")
def test_default_tasks_are_the_shared_bigbench_folder():
    found = find_tasks()
    assert found == sorted((DATA / "bigbench").glob("*/task.json"))
    for path in found:
        assert load_task(path).examples


def test_subset_is_deterministic_sorted_and_capped():
    first = select_examples(100, 10, seed=3)
    assert first == select_examples(100, 10, seed=3)
    assert first == sorted(first) and len(set(first)) == 10 and all(0 <= i < 100 for i in first)
    assert select_examples(100, 10, seed=4) != first
    assert select_examples(5, 10) == list(range(5)) and select_examples(5, None) == list(range(5))


def test_choice_tokens_follow_the_prompt_with_the_space_moved_to_the_choice(tiny_tokenizer):
    example = Example(prompt="\nQ: The sky is\nA: ", choices=("blue", "green sea"), target_scores=(1.0, 0.0))
    context = tiny_tokenizer("\nQ: The sky is\nA:").input_ids
    for (ids, start), choice in zip(choice_sequences(tiny_tokenizer, example), example.choices):
        assert start == len(context) and ids[:start] == context
        assert tiny_tokenizer.decode(ids[start:]) == " " + choice


class FakeScorer:
    """Every token's NLL is the token id / 10, so a choice's log-probability is minus its ids' sum / 10."""

    def __init__(self):
        self.requests = []

    def score_continuations(self, requests):
        self.requests.append(requests)
        return [TokenScores(nll=torch.tensor(c, dtype=torch.float32) / 10, argmax=torch.zeros(len(c), dtype=torch.int64))
                for _, c in requests]


def test_choice_log_probs_sum_the_choice_tokens_only():
    sequences = [([5, 6, 7, 1, 2], 3), ([5, 6, 7, 4], 3)]
    scorer = FakeScorer()
    assert choice_log_probs(scorer, sequences) == pytest.approx([-0.3, -0.4])
    # one call per item, the prompt split off as the shared context
    assert scorer.requests == [[([5, 6, 7], [1, 2]), ([5, 6, 7], [4])]]


class CharTokenizer:
    """One token per character (its code point): choice scores are predictable by hand."""

    def __call__(self, text, add_special_tokens=True):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()


def test_accuracy_counts_examples_whose_best_choice_scores_one(tmp_path):
    # FakeScorer prefers the choice with the smallest code-point sum: "a" (97) over "b" (98), "ab" over "zz".
    write_task(tmp_path / "t", {"examples": [
        {"input": "1", "target_scores": {"a": 1, "b": 0}},  # picks a: correct
        {"input": "2", "target_scores": {"b": 1, "a": 0}},  # picks a: wrong
        {"input": "3", "target_scores": {"zz": 0, "ab": 1}},  # picks ab: correct
        {"input": "4", "target_scores": {"ab": 0.5, "zz": 1}},  # picks ab (score 0.5): wrong
    ]})
    result = evaluate_task(FakeScorer(), CharTokenizer(), load_task(tmp_path / "t"))
    assert result.chosen == [0, 1, 1, 0] and result.correct == [True, False, True, False]
    assert result.accuracy == 0.5 and result.n == 4
    assert result.chance == pytest.approx((1 / 2 + 1 / 2 + 1 / 2 + 1 / 2) / 4)  # one choice of two scores 1 each time
    capped = evaluate_task(FakeScorer(), CharTokenizer(), load_task(tmp_path / "t"), limit=2, seed=0)
    assert capped.n == 2 and capped.indices == select_examples(4, 2, 0)
