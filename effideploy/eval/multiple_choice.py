"""Multiple-choice accuracy on BIG-bench JSON tasks and on the zero-shot suite (``effideploy.eval.zeroshot``:
BoolQ, PIQA, ... in lm-eval's formats, named on ``--task`` by name), through any runtime's ``score_continuations``.

The prompt is built as BIG-bench's ``JsonTask`` builds it (zero-shot): ``task_prefix + example_input_prefix +
input [+ choice_prefix + choice_prefix.join(choices)] + example_output_prefix``, with BIG-bench's defaults
``"\\nQ: "``, ``"\\nA: "`` and ``"\\n  choice: "``; choices are listed in the file's order. Each choice is scored by
the summed log-probability of its tokens after the prompt; the example counts as correct when the best-scored
choice has target score 1. Trailing whitespace of the prompt moves to the front of the choice (``"A:"`` +
``" Yes"``), as lm-evaluation-harness does, so a BPE tokenizer sees the word with its leading space.

A zero-shot suite example carries lm-eval's requests instead (one context per choice, so WinoGrande's partial
scoring fits) and is tokenized exactly as lm-eval's HF model tokenizes (``zeroshot.lm_eval_encode``); it is scored
both ways lm-eval scores it, ``acc`` (summed log-probability) and ``acc_norm`` (divided by the choice's length in
characters), and the task's ``metric`` names which of the two is its accuracy (OP/OG, loyalty, the report).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from effideploy import progress
from effideploy.errors import EffideployError

BIGBENCH_FOLDER = "bigbench"
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]
    target_scores: tuple[float, ...]
    contexts: tuple[str, ...] | None = None  # zero-shot suite: lm-eval's context per choice (``choices`` = continuations)
    norm_lengths: tuple[int, ...] | None = None  # zero-shot suite: acc_norm's divisor per choice


@dataclass
class Task:
    name: str
    path: str
    examples: list[Example]
    metric: str = "acc"  # which score is the task's accuracy: acc, or acc_norm (zero-shot tasks that report it)


@dataclass
class TaskResult:
    name: str
    accuracy: float
    chosen: list[int] = field(repr=False)  # index of the best-scored choice per example
    correct: list[bool] = field(repr=False)
    indices: list[int] = field(repr=False)  # which examples of the file were evaluated
    chance: float = float("nan")  # expected accuracy of a uniform random pick over the same examples
    metric: str = "acc"  # what ``accuracy``, ``chosen`` and ``correct`` are
    scores: dict = field(default_factory=dict)  # zero-shot: {"acc": ..., "acc_norm": ...}
    chosen_by: dict = field(default_factory=dict, repr=False)  # zero-shot: {metric: chosen index per example}

    @property
    def n(self) -> int:
        return len(self.chosen)

    @property
    def stderr(self) -> float:
        return mean_stderr(self.correct)

    def to_dict(self) -> dict:
        out = {"name": self.name, "accuracy": self.accuracy, "stderr": self.stderr, "metric": self.metric,
               "n": self.n, "chance": self.chance, "indices": self.indices, "chosen": self.chosen,
               "correct": self.correct}
        if self.scores:
            out["scores"] = self.scores
            out["chosen_by"] = self.chosen_by
        return out


def mean_stderr(values) -> float:
    """Standard error of a mean as lm-eval computes it (sample standard deviation / sqrt(n)); NaN below 2 items."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def load_suite_task(name: str) -> Task:
    """A zero-shot suite task (``effideploy.eval.zeroshot``) as a Task over its validation split."""
    from effideploy.eval import zeroshot

    examples = [Example(prompt=item.contexts[0], choices=item.continuations,
                        target_scores=tuple(float(i == item.gold) for i in range(len(item.continuations))),
                        contexts=item.contexts, norm_lengths=item.norm_lengths)
                for item in zeroshot.load_items(name)]
    return Task(name=name, path=str(zeroshot.data_file(name)), examples=examples, metric=zeroshot.SUITE[name].metric)


def load_task(path: str | Path) -> Task:
    """A BIG-bench ``task.json`` (or a folder holding one; examples without ``target_scores`` are skipped), or the
    name of a zero-shot suite task (``piqa``...) where no such path exists."""
    from effideploy.eval.zeroshot import is_suite_name

    if is_suite_name(path):
        return load_suite_task(str(path))
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "task.json"
    if not path.is_file():
        raise EffideployError(f"BIG-bench task {path} not found (give a task.json or a folder holding one)")
    from effideploy.safe_files import read_json

    data = read_json(path, what="BIG-bench task", expect=None)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise EffideployError(f"{path} is not a BIG-bench JSON task: it needs an \"examples\" list")
    task_prefix = data.get("task_prefix", "")
    input_prefix = data.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    output_prefix = data.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    choice_prefix = data.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
    append_choices = data.get("append_choices_to_input", True)
    examples = []
    for number, record in enumerate(data["examples"]):
        targets = record.get("target_scores") if isinstance(record, dict) else None
        if not isinstance(targets, dict) or not targets or not isinstance(record.get("input"), str):
            continue
        choices = tuple(str(choice) for choice in targets)
        text = record["input"]
        if append_choices:
            text = text + choice_prefix + choice_prefix.join(choices)
        try:
            scores = tuple(float(value) for value in targets.values())
        except (TypeError, ValueError):
            raise EffideployError(f"{path}: example {number} has non-numeric target_scores") from None
        examples.append(Example(prompt=task_prefix + input_prefix + text + output_prefix, choices=choices,
                                target_scores=scores))
    if not examples:
        raise EffideployError(f"{path} has no multiple-choice examples (none with \"input\" and \"target_scores\")")
    name = data.get("name") or path.parent.name
    return Task(name=str(name), path=str(path.resolve()), examples=examples)


def find_tasks(paths: Sequence[str | Path] = (), data_dir: str | None = None) -> list[Path]:
    """task.json files: the given files or folders (a folder of task folders counts too), else every task under
    ``bigbench/`` in the data folders (``--data-dir``, $EFFIDEPLOY_DATA_DIR, shared/data). Zero-shot suite names
    stay names (``zeroshot`` becomes the seven), for ``load_task``."""
    from effideploy.eval.zeroshot import expand, is_suite_name

    if not paths:
        from effideploy.data.text import _candidate_data_dirs

        for folder in _candidate_data_dirs(data_dir):
            found = sorted((folder / BIGBENCH_FOLDER).glob("*/task.json"))
            if found:
                return found
        return []
    found = []
    for given in paths:
        if is_suite_name(given):
            found.extend(expand(str(given)))
            continue
        path = Path(given).expanduser()
        if path.is_dir() and not (path / "task.json").is_file():
            nested = sorted(path.glob("*/task.json"))
            if not nested:
                raise EffideployError(f"{path} holds no task.json (nor */task.json)")
            found.extend(nested)
        else:
            found.append(path / "task.json" if path.is_dir() else path)
    return found


def select_examples(n_examples: int, limit: int | None, seed: int = 0) -> list[int]:
    """A deterministic subset of example indices (in file order): all of them when ``limit`` is None or larger."""
    if limit is None or limit >= n_examples:
        return list(range(n_examples))
    return sorted(random.Random(seed).sample(range(n_examples), limit))


def choice_sequences(tokenizer, example: Example) -> list[tuple[list[int], int]]:
    """Per choice: (prompt + choice token ids, index of the first choice token)."""
    stripped = example.prompt.rstrip()
    moved = example.prompt[len(stripped):]
    context = tokenizer(stripped, add_special_tokens=True).input_ids
    sequences = []
    for choice in example.choices:
        whole = tokenizer(stripped + moved + choice, add_special_tokens=True).input_ids
        if whole[: len(context)] != context:  # the choice merged with the prompt's last token: score it apart
            whole = context + tokenizer(moved + choice, add_special_tokens=False).input_ids
        if len(whole) <= len(context):
            raise EffideployError(f"choice {choice!r} tokenizes to nothing after its prompt")
        sequences.append((whole, len(context)))
    return sequences


def choice_log_probs(runtime, sequences: list[tuple[list[int], int]]) -> list[float]:
    """Summed log-probability of each choice's tokens after its prompt, through ``runtime.score_continuations``
    (any runtime: the choices of an item share their prompt, which the runtime prefills once, compressed when
    token compression is attached)."""
    requests = [(ids[:start], ids[start:]) for ids, start in sequences]
    return [-float(scores.nll.sum()) for scores in runtime.score_continuations(requests)]


def lm_eval_log_probs(runtime, tokenizer, example: Example) -> list[float]:
    """Summed log-probability of each continuation of a zero-shot example, tokenized as lm-eval does."""
    from effideploy.eval.zeroshot import lm_eval_encode

    requests = [lm_eval_encode(tokenizer, context, continuation)
                for context, continuation in zip(example.contexts, example.choices)]
    return [-float(scores.nll.sum()) for scores in runtime.score_continuations(requests)]


def _argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties: the first listed choice, as numpy's argmax


def evaluate_task(runtime, tokenizer, task: Task, limit: int | None = None, seed: int = 0) -> TaskResult:
    indices = select_examples(len(task.examples), limit, seed)
    chosen_by: dict[str, list[int]] = {"acc": [], "acc_norm": []}
    for index in progress.track(indices, f"{task.name}"):
        example = task.examples[index]
        if example.contexts is None:
            log_probs = choice_log_probs(runtime, choice_sequences(tokenizer, example))
            chosen_by["acc"].append(_argmax(log_probs))
            continue
        log_probs = lm_eval_log_probs(runtime, tokenizer, example)
        chosen_by["acc"].append(_argmax(log_probs))
        chosen_by["acc_norm"].append(_argmax([lp / n for lp, n in zip(log_probs, example.norm_lengths)]))
    corrects = {metric: [task.examples[i].target_scores[best] == 1 for i, best in zip(indices, chosen)]
                for metric, chosen in chosen_by.items() if len(chosen) == len(indices)}
    scores = {metric: sum(c) / len(c) if c else float("nan") for metric, c in corrects.items()}
    metric = task.metric if task.metric in corrects else "acc"
    chance = [sum(score == 1 for score in task.examples[i].target_scores) / len(task.examples[i].choices) for i in indices]
    suite = task.examples and task.examples[0].contexts is not None
    return TaskResult(name=task.name, accuracy=scores[metric], chosen=chosen_by[metric], correct=corrects[metric],
                      indices=indices, chance=sum(chance) / len(chance) if chance else float("nan"), metric=metric,
                      scores=scores if suite else {}, chosen_by=chosen_by if suite else {})
