"""Parity of a quantized vLLM export (``export --runtime vllm --quantize``): vLLM's teacher-forced scores against a
reference that computes what this machine's vLLM kernels compute from the export's stored integers and scales.
Kept apart from ``checks`` (the unquantized checks and the vLLM child process it shares)."""

from __future__ import annotations

import time
from pathlib import Path

from effideploy import progress
from effideploy.errors import EffideployError, ParityError
from effideploy.exporters.base import parity_prompts
from effideploy.exporters.vllm.checks import (PARITY_NEW_TOKENS, QUANTIZED_DECIDED_MARGIN, QUANTIZED_TOP1_AGREEMENT,
                                              _logits, vllm_scores)
from effideploy.exporters.vllm.records import VllmQuantizedParity, VsUnquantized


def check_quantized_parity(folder: Path, source, *, dtype: str, kv_cache_dtype: str | None = None,
                           int8_gemm: str | None = None, require: bool = True) -> VllmQuantizedParity:
    """Tolerance-based parity of a quantized export (``effideploy.exporters.vllm.quant``).

    Sequences: the parity prompts, each continued by 16 greedy tokens of the reference. Reference: the export's own
    stored weights dequantized by compressed-tensors (q x scale) through transformers in float32, and for w8a8 each
    quantized Linear's input quantized per token to int8 (symmetric, absmax / 127, round half to even: what
    vLLM's dynamic ``scaled_int8_quant`` does) and multiplied by the stored codes in the integer arithmetic this
    machine's oneDNN runs (exact with VNNI, int16-saturating on AVX2: ``runtimes/vllm_kernels``). vLLM scores the same sequences teacher-forced; its argmax must equal
    the reference's at >= QUANTIZED_TOP1_AGREEMENT of the positions. Recorded beside it: the largest difference
    between vLLM's and the reference's log-probability of the scored tokens, and (informational) top-1 agreement
    and logit error of the quantized model against the unquantized source. ``int8_gemm`` overrides the probed GEMM
    arithmetic (``vllm_kernels.INT8_EXACT`` / ``INT8_SATURATING``) and ``require=False`` returns a failing record
    instead of raising: for the evidence script that compares the two (benchmarks/scripts/vllm_int8_kernel.py)."""
    import torch

    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.runtimes.pytorch import TorchRuntime

    prompts, text = parity_prompts(load_tokenizer(folder))
    tick = time.perf_counter()
    with progress.status("Parity: the fake-quantized reference in transformers"):
        model, scheme = fake_quant_reference(folder, int8_gemm)
        generated = TorchRuntime(model=model).generate(prompts, PARITY_NEW_TOKENS).tokens
        sequences = [prompt + tokens for prompt, tokens in zip(prompts, generated)]
        reference = _logits(model, sequences)
        del model
        dense = _logits(load_model(source, dtype=torch.float32), sequences)
    transformers_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    with progress.status("Parity: scoring in vLLM"):
        run = vllm_scores(folder, sequences, dtype=dtype)
    vllm_seconds = time.perf_counter() - tick

    agree = agree_dense = total = agree_all = 0
    logprob_gap = logprob_gap_dense = logit_error_dense = 0.0
    for sequence, ref, base, vllm_logprobs, vllm_argmax in zip(sequences, reference, dense, run["logprobs"], run["argmax"]):
        targets = torch.tensor(sequence[1:])
        got = torch.tensor(vllm_argmax)
        top2 = ref.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > QUANTIZED_DECIDED_MARGIN * float(ref.abs().max())
        same = ref.argmax(-1) == got
        agree += int((same & decided).sum())
        agree_all += int(same.sum())
        agree_dense += int((base.argmax(-1) == got).sum())
        total += int(decided.sum())
        vllm_lp = torch.tensor(vllm_logprobs)
        ref_lp = ref.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        base_lp = base.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        logprob_gap = max(logprob_gap, float((vllm_lp - ref_lp).abs().max()))
        logprob_gap_dense = max(logprob_gap_dense, float((vllm_lp - base_lp).abs().max()))
        logit_error_dense = max(logit_error_dense, float((ref - base).abs().max()))
    positions = sum(len(sequence) - 1 for sequence in sequences)
    agreement = agree / total if total else agree_all / positions
    result = VllmQuantizedParity(
        prompts=len(prompts), prompt_tokens=[len(p) for p in prompts], new_tokens=PARITY_NEW_TOKENS,
        text=text, dtype=dtype, positions=positions, decided_positions=total,
        top1_agreement_all_positions=agree_all / positions,
        reference=f"transformers {__import__('transformers').__version__} (float32) on the dequantized stored weights"
                  + (f", int8 per-token activations, {int8_gemm or _int8_gemm()} int8 GEMM"
                     if scheme.input_activations is not None else ""),
        top1_agreement=agreement, top1_tolerance=QUANTIZED_TOP1_AGREEMENT,
        max_abs_logprob_diff=logprob_gap,
        criterion=f"vLLM's teacher-forced top-1 equals the fake-quant reference's at >= {QUANTIZED_TOP1_AGREEMENT:.0%} "
                  f"of the positions where the reference's top-1 margin exceeds {QUANTIZED_DECIDED_MARGIN:.0%} of "
                  "its largest |logit|",
        match=agreement >= QUANTIZED_TOP1_AGREEMENT,
        vs_unquantized=VsUnquantized(
            top1_agreement=agree_dense / positions, max_abs_logit_diff=logit_error_dense,
            max_abs_logprob_diff=logprob_gap_dense,
            note="informational: vLLM's argmax and log-probabilities against the unquantized source "
                 "(float32, transformers); logit diff is the fake-quant reference's against it"),
        tensor_parallel_size_checked=1,
        seconds={"transformers": transformers_seconds, "vllm": vllm_seconds, "vllm_engine_start": run["start_seconds"]},
    )
    if require and agreement < QUANTIZED_TOP1_AGREEMENT:
        raise ParityError(
            f"vLLM parity failed for the quantized export: teacher-forced top-1 agreement with the fake-quant reference "
            f"{agreement:.1%} < {QUANTIZED_TOP1_AGREEMENT:.0%} on {total} decided positions ({agree_all}/{positions} "
            f"over all), max |log-prob diff| {logprob_gap:.3g}; the export was not kept")
    return result


def fake_quant_reference(folder: Path, int8_gemm: str | None = None):
    """The export in transformers, float32: stored weights dequantized by compressed-tensors, and (w8a8) each
    quantized Linear's input fake-quantized per token. Returns the model and the compressed-tensors scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    from effideploy.exporters.vllm.quant import dequantize_state_dict
    from effideploy.models.build import build_config, model_class
    from effideploy.models.resolve import read_config_dict
    from effideploy.models.weights import SafetensorsWeights

    config_dict = dict(read_config_dict(folder))
    qconfig = QuantizationConfig.model_validate(config_dict.pop("quantization_config"))
    (scheme,) = qconfig.config_groups.values()
    if scheme.format is None:
        scheme.format = qconfig.format
    config = build_config(config_dict)
    weights = SafetensorsWeights(folder)
    state = dequantize_state_dict({name: weights.get(name) for name in weights.names()}, scheme)
    model = model_class(config)(config).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise EffideployError(f"{folder}: the dequantized weights do not fit the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    quantized = {name.rsplit(".", 1)[0] for name in weights.names() if name.endswith(".weight_scale")}
    if scheme.input_activations is not None:
        from effideploy.runtimes.vllm_kernels import INT8_SATURATING, probe

        # The GEMM this machine's vLLM runs: exact int8 with VNNI, int16-saturating pair sums on AVX2 (see
        # runtimes/vllm_kernels.py); the reference computes the same integers from the stored codes.
        saturating = (int8_gemm or probe().int8_mm) == INT8_SATURATING
        for name, module in model.named_modules():
            if name in quantized:
                module.forward = W8A8Forward(module, weights.get(name + ".weight"), weights.get(name + ".weight_scale"),
                                              saturating)
    return model, scheme


def _int8_gemm() -> str:
    from effideploy.runtimes.vllm_kernels import probe

    return probe().int8_mm


class W8A8Forward:
    """A quantized Linear as vLLM's CPU W8A8 computes it: per-token int8 activations times the stored int8 codes,
    in the integer arithmetic of this machine's oneDNN path, scaled back (activation scale x channel scale)."""

    def __init__(self, module, codes, scale, saturating: bool):
        self.module, self.codes, self.saturating = module, codes, saturating
        self.scale = scale.float().reshape(-1)  # one per output channel (compressed-tensors' CHANNEL strategy)

    def __call__(self, x):
        import torch

        from effideploy.runtimes.vllm_kernels import int8_mm, quantize_per_token

        shape = x.shape
        xq, xs = quantize_per_token(x.reshape(-1, shape[-1]))
        acc = int8_mm(xq.to(torch.int8), self.codes, saturating=self.saturating)
        out = (acc * xs.double() * self.scale.double()[None, :]).to(x.dtype)
        if self.module.bias is not None:
            out = out + self.module.bias
        return out.reshape(*shape[:-1], out.shape[-1])
