"""Generation fidelity on chat prompts: what a served instruct model answers, candidate against dense.

A deployment of an instruct model serves its chat template, so this measure sends each prompt of a committed set of
general instructions (``effideploy/data/chat_prompts.json``) as one user message through the tokenizer's own chat
template (``apply_chat_template(..., add_generation_prompt=True)``: the template's default system prompt, when it
has one, included, as a server renders it), generates a greedy response with the runtime adapter's ``generate``
(the shipped artifact on ONNX Runtime, vLLM, llama.cpp or PyTorch alike) and compares the candidate's response with
the dense model's, prompt by prompt:

- **exact match**: the two responses are the same tokens;
- **token F1**: overlap of the two bags of response tokens (SQuAD-style F1 on the model's token ids);
- **ROUGE-L**: F-measure of the longest common subsequence of the two token sequences (precision = LCS / candidate
  length, recall = LCS / dense length), as ``rouge_score``'s ``rougeL`` computes it on its word tokens;
- **dense log-likelihood**: the dense model's mean per-token log-likelihood of the candidate's response after the
  same rendered prompt (the dense runtime's ``score_continuations``), beside that of the dense model's own response.
  A candidate that says something dense would also say scores close to dense's own; a response dense would not
  give (a recited system prompt, a loop) scores far below it.

A response is the generated tokens up to the first stop token (the tokenizer's EOS and the model config's
``eos_token_id``s), which is excluded from the text metrics and included in the log-likelihood when it was
generated (stopping is part of what the model says). The adapters generate a fixed number of tokens (vLLM with
``ignore_eos``), so the cut is made here, the same way for every runtime. Two empty responses are identical (F1 and
ROUGE-L 1.0).

A tokenizer without a chat template is not an instruct model's: the measure is skipped with that reason (the bench
notes it, and a policy threshold on it then fails as not measured).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources

from effideploy import progress
from effideploy.errors import EffideployError

CHAT_PROMPTS_RESOURCE = "chat_prompts.json"  # package data of effideploy.data


def load_chat_prompts(count: int | None = None) -> list[str]:
    """The first ``count`` prompts of the packaged set (None: all); more than the set holds is a one-line error."""
    text = (resources.files("effideploy.data") / CHAT_PROMPTS_RESOURCE).read_text(encoding="utf-8")
    prompts = [str(p) for p in json.loads(text)["prompts"]]
    if count is None:
        return prompts
    if count < 0 or count > len(prompts):
        raise EffideployError(f"--chat-prompts must be between 0 and {len(prompts)} (the packaged chat prompt set), "
                              f"got {count}")
    return prompts[:count]


def chat_template_missing(tokenizer) -> str | None:
    """Why the measure cannot run on ``tokenizer`` (None: it can)."""
    if not getattr(tokenizer, "chat_template", None):
        return "the tokenizer has no chat template (not an instruct model)"
    return None


def render_chat(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn through the tokenizer's chat template, ready for the assistant's reply: the
    template's text tokenized without added special tokens (the template writes the ones the model expects)."""
    reason = chat_template_missing(tokenizer)
    if reason is not None:
        raise EffideployError(f"chat prompts: {reason}")
    rendered = []
    for index, prompt in enumerate(prompts):
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template that fails on a plain user turn is the model's
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EffideployError(f"chat prompt {index}: the tokenizer's chat template failed: {detail}") from None
        rendered.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return rendered


def stop_token_ids(tokenizer, config_dict: dict | None = None) -> frozenset[int]:
    """The tokens that end a response: the tokenizer's EOS and the model config's ``eos_token_id`` (int or list)."""
    ids = set()
    candidates = [getattr(tokenizer, "eos_token_id", None), (config_dict or {}).get("eos_token_id")]
    for value in candidates:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int):
                ids.add(item)
    return frozenset(ids)


def cut_at_stop(tokens: Sequence[int], stop: frozenset[int]) -> tuple[list[int], int | None]:
    """(the response before the first stop token, that stop token or None when none was generated)."""
    for index, token in enumerate(tokens):
        if token in stop:
            return list(tokens[:index]), int(token)
    return list(tokens), None


@dataclass
class ChatResponses:
    """One model's greedy responses to the rendered chat prompts."""

    prompts: list[str]
    responses: list[list[int]]  # per prompt: generated ids before the first stop token
    stop_tokens: list[int | None]  # per prompt: the stop token generated, None when the response ran to max tokens
    texts: list[str]  # the responses decoded (special tokens skipped)
    max_new_tokens: int
    loglik: list[float] | None = None  # per prompt: the dense model's mean per-token log-likelihood of the response

    @property
    def n(self) -> int:
        return len(self.responses)

    @property
    def stopped_share(self) -> float:
        return sum(t is not None for t in self.stop_tokens) / self.n if self.n else float("nan")

    @property
    def mean_tokens(self) -> float:
        return sum(map(len, self.responses)) / self.n if self.n else float("nan")

    @property
    def mean_loglik(self) -> float | None:
        return _mean(self.loglik) if self.loglik else None

    def scored(self, index: int) -> list[int]:
        """What the dense model scores for prompt ``index``: the response with its stop token when one came."""
        stop = self.stop_tokens[index]
        return self.responses[index] + ([] if stop is None else [stop])

    def to_dict(self) -> dict:
        return {**asdict(self), "stopped_share": self.stopped_share, "mean_tokens": self.mean_tokens,
                "mean_loglik": self.mean_loglik}


def generate_responses(runtime, prompt_ids: list[list[int]], prompts: Sequence[str], tokenizer, max_new_tokens: int,
                       stop: frozenset[int], *, description: str = "Chat responses") -> ChatResponses:
    """Greedy responses through ``runtime.generate``, one prompt at a time (progress per prompt)."""
    responses, stops, texts = [], [], []
    with progress.Bar(description, len(prompt_ids)) as bar:
        for ids in prompt_ids:
            tokens = runtime.generate([ids], max_new_tokens).tokens[0]
            response, stop_token = cut_at_stop(tokens, stop)
            responses.append(response)
            stops.append(stop_token)
            texts.append(tokenizer.decode(response, skip_special_tokens=True))
            bar.advance()
    return ChatResponses(prompts=list(prompts), responses=responses, stop_tokens=stops, texts=texts,
                         max_new_tokens=max_new_tokens)


def score_responses(dense_runtime, prompt_ids: list[list[int]], responses: ChatResponses) -> list[float]:
    """The dense model's mean per-token log-likelihood of each response after its rendered prompt."""
    requests = [(prompt_ids[i], responses.scored(i)) for i in range(responses.n)]
    return [-float(scores.nll.double().mean()) for scores in dense_runtime.score_continuations(requests)]


# ------------------------------------------------------------------------------------------------ metrics

def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(reference: Sequence, candidate: Sequence) -> float:
    """ROUGE-L F-measure of ``candidate`` against ``reference`` (token sequences): 2PR / (P + R) with P = LCS /
    len(candidate), R = LCS / len(reference); 1.0 for two empty sequences, 0.0 when only one is empty."""
    if not reference and not candidate:
        return 1.0
    lcs = lcs_length(reference, candidate)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def token_f1(reference: Sequence, candidate: Sequence) -> float:
    """F1 of the token overlap (bags of tokens, counts clipped), as SQuAD scores an answer; 1.0 for two empty."""
    if not reference and not candidate:
        return 1.0
    common = sum((Counter(reference) & Counter(candidate)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def exact_match(reference: Sequence, candidate: Sequence) -> float:
    return float(list(reference) == list(candidate))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@dataclass
class ChatFidelity:
    """A candidate's responses against dense's on the same prompts: means over prompts and each prompt's values."""

    n: int
    exact_match: float
    token_f1: float
    rouge_l: float
    loglik: float | None  # dense's mean per-token log-likelihood of the candidate's responses (mean over prompts)
    loglik_dense: float | None  # the same of dense's own responses
    items: list[dict] = field(default_factory=list)

    @property
    def loglik_drop(self) -> float | None:
        """Dense's own response log-likelihood minus the candidate's (nats per token; 0 = as likely as dense's)."""
        if self.loglik is None or self.loglik_dense is None:
            return None
        return self.loglik_dense - self.loglik


def compare_responses(dense: ChatResponses, candidate: ChatResponses) -> ChatFidelity:
    if dense.prompts != candidate.prompts:
        raise EffideployError("chat responses to compare were given different prompts")
    items = []
    for i in range(dense.n):
        ref, cand = dense.responses[i], candidate.responses[i]
        items.append({"prompt": i, "exact_match": exact_match(ref, cand), "token_f1": token_f1(ref, cand),
                      "rouge_l": rouge_l(ref, cand),
                      "loglik": candidate.loglik[i] if candidate.loglik else None,
                      "loglik_dense": dense.loglik[i] if dense.loglik else None})
    return ChatFidelity(n=dense.n, exact_match=_mean(x["exact_match"] for x in items),
                        token_f1=_mean(x["token_f1"] for x in items), rouge_l=_mean(x["rouge_l"] for x in items),
                        loglik=candidate.mean_loglik, loglik_dense=dense.mean_loglik, items=items)
