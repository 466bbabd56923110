"""Bring your own evaluation: lm-evaluation-harness tasks run through its Python API on any effideploy runtime.

``EffideployLM`` (built on lm-eval's own ``LM`` base class, so lm-eval is imported only when asked for) answers
lm-eval's three request types with the runtime adapter's calls: ``loglikelihood`` -> ``score_continuations``,
``loglikelihood_rolling`` -> ``score_windows`` (windows of the runtime's context), ``generate_until`` ->
``generate`` (greedy) cut at the first stop string. lm-eval and the task's data are checked before any work:
without them the command stops with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from effideploy import progress
from effideploy.errors import EffideployError

INSTALL = "pip install lm-eval==0.4.13"
ROLLING_WINDOW = 1024


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
    manager = TaskManager()
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise EffideployError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm-eval lists its tasks with "
                              "`lm-eval ls tasks`)")
    try:
        manager.load_task_or_group(list(tasks))  # reads the datasets: missing data fails here, not after the bench
    except Exception as exc:  # noqa: BLE001 - datasets raise many kinds (offline, missing files): all mean "no data"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EffideployError(f"the data of lm-eval task(s) {', '.join(tasks)} could not be loaded: {first}") from None
    return LmEval(lm_eval, manager)


def adapter_class(lm_eval_module):
    """``EffideployLM``, a subclass of ``lm_eval.api.model.LM`` over an open effideploy runtime."""
    base = lm_eval_module.api.model.LM

    class EffideployLM(base):
        def __init__(self, runtime, tokenizer) -> None:
            super().__init__()
            self.runtime, self.tokenizer = runtime, tokenizer

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """Context and continuation ids as lm-eval's HF model splits them: the whole string encoded, the
            continuation being what follows the context's own encoding (a merge at the seam is scored apart)."""
            context_ids = self.tokenizer(context, add_special_tokens=True).input_ids
            whole = self.tokenizer(context + continuation, add_special_tokens=True).input_ids
            if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
                return context_ids, whole[len(context_ids):]
            return context_ids, self.tokenizer(continuation, add_special_tokens=False).input_ids

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


def evaluate_runtime(lm: LmEval, runtime, tokenizer, tasks, limit: int | None) -> dict:
    """{task: {metric: value}} of lm-eval's ``simple_evaluate`` on an open runtime."""
    model = adapter_class(lm.module)(runtime, tokenizer)
    results = lm.module.simple_evaluate(model=model, tasks=list(tasks), limit=limit, task_manager=lm.task_manager)
    return {task: {metric: value for metric, value in values.items() if isinstance(value, (int, float))}
            for task, values in (results or {}).get("results", {}).items()}


def evaluate_runtime_artifact(lm: LmEval, runtime_name: str, path: str, tokenizer, tasks, limit: int | None,
                              compression=None) -> dict:
    from effideploy.runtimes import open_runtime

    runtime = open_runtime(runtime_name, path)
    try:
        if compression:
            runtime.compress(compression)
        return evaluate_runtime(lm, runtime, tokenizer, tasks, limit)
    finally:
        runtime.close()
