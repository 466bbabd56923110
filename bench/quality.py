"""Accuracy through the runtime's own scoring: WikiText-2 perplexity and BIG-bench multiple choice.

A token-compression candidate (the dense model with a compression spec) is scored with its context compressed:
perplexity windows are split in half (the first half prefilled and compressed, the second half teacher-forced) and
choices are scored after a compressed prompt; the comparison then reads the dense model's perplexity on the same
second halves. The argmax predictions and chosen options feed loyalty. Where whole windows are scored, the same
forward gives each position's top-k log-probabilities: dense's top-k, and the candidate's top-k and its
log-probabilities of dense's top-k ids, from which KL, top-k and top-1 agreement to dense are measured on the
runtime's artifact (``bench/fidelity.py``; a compressed candidate, scored on second halves, has none). Chat fidelity (``--chat-prompts``): greedy
responses to chat-template prompts, scored by the dense model (``effideploy.eval.chat``).
"""

from __future__ import annotations

from effideploy import progress
from effideploy.bench.config import BenchConfig
from effideploy.bench.results import ModelResult
from effideploy.eval.perplexity import window_perplexity


def measure_perplexity(model: ModelResult, runtime, windows, dense: ModelResult | None = None) -> None:
    """Perplexity of ``model`` on ``windows``. The dense model (``dense`` None) keeps its top-m next-token
    log-probabilities (m = ``fidelity.KL_SUPPORT``); a candidate (``dense`` given, already measured) is scored on the same windows with its own
    top-k and its log-probabilities of dense's top-k ids, and ``model.fidelity`` measured against dense's."""
    from effideploy.bench.fidelity import KL_SUPPORT, TOP_K, measure, text_label

    compressed = model.compression is not None
    reference = None if dense is None or dense.perplexity is None else dense.perplexity.distributions
    support = None if reference is None or compressed else [scores.top_ids for scores in reference]
    if dense is None:
        top_k = 0 if compressed else KL_SUPPORT  # dense: the KL's support (its first TOP_K: the agreement's)
    else:
        top_k = 0 if support is None else TOP_K
    model.perplexity = window_perplexity(runtime, windows, compressed=compressed,
                                         description=f"Perplexity {model.label}", top_k=top_k, support=support)
    if support is not None:
        model.fidelity = measure(reference, model.perplexity.distributions,
                                 source=text_label(runtime.name, len(support), model.perplexity.seqlen))


def measure_multiple_choice(model: ModelResult, runtime, tasks, tokenizer, config: BenchConfig) -> None:
    from effideploy.eval.multiple_choice import evaluate_task

    model.tasks = {task.name: evaluate_task(runtime, tokenizer, task, limit=config.mc_limit, seed=config.seed)
                   for task in tasks}


def measure_chat(models: list[ModelResult], runtimes, prompt_ids: list[list[int]], prompts: list[str], tokenizer,
                 config: BenchConfig, stop: frozenset[int]) -> None:
    """Every model's greedy responses to the rendered chat prompts (each with its own compression attached), then
    the dense model's log-likelihood of every model's responses, its own included (effideploy.eval.chat)."""
    from effideploy.eval.chat import generate_responses, score_responses

    for model in models:
        model.chat = generate_responses(runtimes[model.label], prompt_ids, prompts, tokenizer, config.chat_new_tokens,
                                        stop, description=f"Chat responses {model.label}")
    dense = runtimes[models[0].label]  # the dense model, compression detached
    with progress.status("Dense log-likelihood of the chat responses"):
        for model in models:
            model.chat.loglik = score_responses(dense, prompt_ids, model.chat)
