"""Accuracy through the runtime's own scoring: WikiText-2 perplexity and BIG-bench multiple choice.

A token-compression candidate (the dense model with a compression spec) is scored with its context compressed:
perplexity windows are split in half (the first half prefilled and compressed, the second half teacher-forced) and
choices are scored after a compressed prompt; the comparison then reads the dense model's perplexity on the same
second halves. The argmax predictions and chosen options feed loyalty. Chat fidelity (``--chat-prompts``): greedy
responses to chat-template prompts, scored by the dense model (``effideploy.eval.chat``).
"""

from __future__ import annotations

from effideploy import progress
from effideploy.bench.config import BenchConfig
from effideploy.bench.results import ModelResult
from effideploy.eval.perplexity import window_perplexity


def measure_perplexity(model: ModelResult, runtime, windows) -> None:
    model.perplexity = window_perplexity(runtime, windows, compressed=model.compression is not None,
                                         description=f"Perplexity {model.label}")


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
