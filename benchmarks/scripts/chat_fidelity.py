"""Chat fidelity on SmolLM2-135M-Instruct (effideploy.eval.chat), PyTorch runtime: dense against its int8 rounding
(ONNX Runtime's MatMulNBits int8 scheme applied as the search's screen applies it, ``apply_scheme``) and against
CFSP at 30% FFN sparsity (calibration ``--calib-samples`` x ``--calib-seqlen`` tokens of WikiText-2 validation), or
against the checkpoints given as ``--checkpoint LABEL=PATH`` (recovered ones, say) instead of that prune.
Each of the first ``--prompts`` packaged chat prompts goes through the model's chat template; greedy responses of
``--new-tokens`` tokens at most; prints the metrics per model and every response, writes ``--output`` (JSON).

    EFFIDEPLOY_PROGRESS=0 nice -n 5 python benchmarks/scripts/chat_fidelity.py --prompts 8 --new-tokens 48 \
        --output benchmarks/results/chat_fidelity_2026-12-02.json

The bench measures the same on the shipped artifact of any runtime (``effideploy bench --chat-prompts N``); this
script exists to choose a policy threshold without exporting (docs/accuracy.md, "Chat fidelity").
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                        help="Models to compare instead of the script's own CFSP prune (e.g. recovered checkpoints).")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    from effideploy.data.text import resolve_text
    from effideploy.eval.chat import (compare_responses, generate_responses, load_chat_prompts, render_chat,
                                      score_responses, stop_token_ids)
    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint
    from effideploy.quantization.schemes import apply_scheme, fitted_scheme
    from effideploy.runtimes.pytorch import TorchRuntime

    torch.set_num_threads(args.threads)
    started = time.time()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    prompts = load_chat_prompts(args.prompts)
    ids = render_chat(tokenizer, prompts)
    stop = stop_token_ids(tokenizer, source.config_dict)
    dense_model = load_model(source, dtype=torch.float32)
    dense = TorchRuntime(model=dense_model, device="cpu")
    int8 = apply_scheme(copy.deepcopy(dense_model), fitted_scheme("onnx", "int8", source.config_dict))
    runtimes = {"dense": dense, "dense+int8 (onnx rounding)": TorchRuntime(model=int8, device="cpu")}
    for item in args.checkpoint:
        label, path = item.split("=", 1)
        runtimes[label] = TorchRuntime(path, device="cpu")
    if not args.checkpoint:
        folder = tempfile.mkdtemp(prefix="chat-fidelity-")
        config = PruneConfig(sparsity=args.sparsity, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
        prune_checkpoint(source, config, f"{folder}/cfsp", calibration=resolve_text("wikitext2", "calibration", None))
        runtimes[f"cfsp-{args.sparsity:g}"] = TorchRuntime(f"{folder}/cfsp", device="cpu")

    responses = {}
    for name, runtime in runtimes.items():
        responses[name] = generate_responses(runtime, ids, prompts, tokenizer, args.new_tokens, stop)
        responses[name].loglik = score_responses(dense, ids, responses[name])
    results = {}
    for name, chat in responses.items():
        fidelity = compare_responses(responses["dense"], chat)
        results[name] = {"exact_match": fidelity.exact_match, "token_f1": fidelity.token_f1,
                         "rouge_l": fidelity.rouge_l, "loglik": fidelity.loglik, "loglik_dense": fidelity.loglik_dense,
                         "loglik_drop": fidelity.loglik_drop, "stopped_share": chat.stopped_share,
                         "mean_tokens": chat.mean_tokens, "rouge_l_per_prompt": [x["rouge_l"] for x in fidelity.items]}
        print(f"{name}: exact match {fidelity.exact_match:.3f}, token F1 {fidelity.token_f1:.3f}, ROUGE-L "
              f"{fidelity.rouge_l:.3f}, dense log-lik {fidelity.loglik:.3f} (dense's own {fidelity.loglik_dense:.3f})")
    for i, prompt in enumerate(prompts):
        print(f"--- {prompt}")
        for name, chat in responses.items():
            print(f"  {name}: {chat.texts[i]!r}")
    payload = {"command": "benchmarks/scripts/chat_fidelity.py", "args": vars(args), "runtime": "torch (cpu, fp32)",
               "seconds": time.time() - started, "results": results, "prompts": prompts,
               "responses": {name: chat.texts for name, chat in responses.items()}}
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(payload, handle, indent=1)


if __name__ == "__main__":
    main()
