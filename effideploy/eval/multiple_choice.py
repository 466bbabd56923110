"""Multiple-choice accuracy on BIG-bench JSON tasks, through any runtime's ``score_continuations``.

The prompt is built as BIG-bench's ``JsonTask`` builds it (zero-shot): ``task_prefix + example_input_prefix +
input [+ choice_prefix + choice_prefix.join(choices)] + example_output_prefix``, with BIG-bench's defaults
``"\\nQ: "``, ``"\\nA: "`` and ``"\\n  choice: "``; choices are listed in the file's order. Each choice is scored by
the summed log-probability of its tokens after the prompt; the example counts as correct when the best-scored
choice has target score 1. Trailing whitespace of the prompt moves to the front of the choice (``"A:"`` +
``" Yes"``), as lm-evaluation-harness does, so a BPE tokenizer sees the word with its leading space.
"""

from __future__ import annotations

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


@dataclass
class Task:
    name: str
    path: str
    examples: list[Example]


@dataclass
class TaskResult:
    name: str
    accuracy: float
    chosen: list[int] = field(repr=False)  # index of the best-scored choice per example
    correct: list[bool] = field(repr=False)
    indices: list[int] = field(repr=False)  # which examples of the file were evaluated
    chance: float = float("nan")  # expected accuracy of a uniform random pick over the same examples

    @property
    def n(self) -> int:
        return len(self.chosen)

    def to_dict(self) -> dict:
        return {"name": self.name, "accuracy": self.accuracy, "n": self.n, "chance": self.chance,
                "indices": self.indices, "chosen": self.chosen, "correct": self.correct}


def load_task(path: str | Path) -> Task:
    """A BIG-bench ``task.json`` (or a folder holding one); examples without ``target_scores`` are skipped."""
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
    ``bigbench/`` in the data folders (``--data-dir``, $EFFIDEPLOY_DATA_DIR, shared/data)."""
    if not paths:
        from effideploy.data.text import _candidate_data_dirs

        for folder in _candidate_data_dirs(data_dir):
            found = sorted((folder / BIGBENCH_FOLDER).glob("*/task.json"))
            if found:
                return found
        return []
    found = []
    for given in paths:
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


def evaluate_task(runtime, tokenizer, task: Task, limit: int | None = None, seed: int = 0) -> TaskResult:
    indices = select_examples(len(task.examples), limit, seed)
    chosen, correct = [], []
    for index in progress.track(indices, f"{task.name}"):
        example = task.examples[index]
        log_probs = choice_log_probs(runtime, choice_sequences(tokenizer, example))
        best = max(range(len(log_probs)), key=log_probs.__getitem__)  # ties: the first listed choice
        chosen.append(best)
        correct.append(example.target_scores[best] == 1)
    accuracy = sum(correct) / len(correct) if correct else float("nan")
    chance = [sum(score == 1 for score in task.examples[i].target_scores) / len(task.examples[i].choices) for i in indices]
    return TaskResult(name=task.name, accuracy=accuracy, chosen=chosen, correct=correct, indices=indices,
                      chance=sum(chance) / len(chance) if chance else float("nan"))
