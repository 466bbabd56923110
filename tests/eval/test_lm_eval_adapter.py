"""The lm-evaluation-harness adapter: lm-eval's request types answered by an effideploy runtime. lm-eval is not
installed here, so a fake module stands in for its API (the base class and simple_evaluate); the scores are checked
against the runtime's own scoring of the same tokens."""

import sys
import types

import pytest
import torch

from effideploy.errors import EffideployError


class Request:
    def __init__(self, *args):
        self.args = args


def fake_lm_eval(known=("toy",), data_error=None):
    module = types.ModuleType("lm_eval")
    module.api = types.SimpleNamespace(model=types.SimpleNamespace(LM=type("LM", (), {"__init__": lambda self: None})))

    class TaskManager:
        all_tasks = list(known)

        def __init__(self, include_path=None, include_defaults=True):
            self.include_path = include_path

        def load_task_or_group(self, names):
            if data_error:
                raise ConnectionError(data_error)
            return {n: object() for n in names}

    module.tasks = types.SimpleNamespace(TaskManager=TaskManager)

    def simple_evaluate(model, tasks, task_manager, limit=None, samples=None):
        ll = model.loglikelihood([Request("The sky is", " blue"), Request("The sky is", " green")])
        rolling = model.loglikelihood_rolling([Request("A short text to score.")])
        text = model.generate_until([Request("Once upon", {"until": ["\n"], "max_gen_toks": 4})])
        return {"results": {tasks[0]: {"acc,none": float(ll[0][0] > ll[1][0]), "rolling": rolling[0],
                                       "generated": len(text[0]), "alias": tasks[0]}}}

    module.simple_evaluate = simple_evaluate
    return module


@pytest.fixture
def runtime(tiny_model_dir):
    from effideploy.runtimes import open_runtime

    opened = open_runtime("torch", str(tiny_model_dir))
    yield opened
    opened.close()


def test_missing_lm_eval_is_one_line(monkeypatch):
    from effideploy.eval.lm_eval_adapter import check_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(EffideployError, match="needs lm-evaluation-harness, which is not installed"):
        check_lm_eval(["hellaswag"])


def test_unknown_task_and_missing_data_are_one_line(monkeypatch):
    from effideploy.eval.lm_eval_adapter import check_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", fake_lm_eval())
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", sys.modules["lm_eval"].tasks)
    with pytest.raises(EffideployError, match="unknown lm-eval task"):
        check_lm_eval(["nope"])
    monkeypatch.setitem(sys.modules, "lm_eval", fake_lm_eval(data_error="Couldn't reach the Hub\nmore"))
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", sys.modules["lm_eval"].tasks)
    with pytest.raises(EffideployError, match="could not be loaded: Couldn't reach the Hub$"):
        check_lm_eval(["toy"])


def test_adapter_scores_as_the_runtime_does(monkeypatch, runtime, tiny_tokenizer):
    from effideploy.eval.lm_eval_adapter import adapter_class, check_lm_eval, evaluate_runtime

    module = fake_lm_eval()
    monkeypatch.setitem(sys.modules, "lm_eval", module)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", module.tasks)
    lm = check_lm_eval(["toy"])
    adapter = adapter_class(module)(runtime, tiny_tokenizer)
    assert isinstance(adapter, module.api.model.LM)
    (logprob, greedy), = adapter.loglikelihood([Request("The sky is", " blue")])
    context = tiny_tokenizer("The sky is").input_ids
    whole = tiny_tokenizer("The sky is blue").input_ids
    expected = runtime.score_continuations([(context, whole[len(context):])])[0]
    assert logprob == pytest.approx(-float(expected.nll.sum()), abs=1e-5) and isinstance(greedy, bool)
    ids = tiny_tokenizer("A short text to score.").input_ids
    assert adapter.loglikelihood_rolling([Request("A short text to score.")])[0] == pytest.approx(
        -float(runtime.score_windows([ids])[0].nll.sum()), abs=1e-4)
    text = adapter.generate_until([Request("Once upon", {"until": ["\n"], "max_gen_toks": 4})])[0]
    assert "\n" not in text
    results = evaluate_runtime(lm, runtime, tiny_tokenizer, ["toy"], limit=5)
    assert set(results["toy"]) == {"acc,none", "rolling", "generated"}  # numbers only
