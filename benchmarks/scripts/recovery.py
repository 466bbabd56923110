"""Recovery fine-tuning on a pruned model: WikiText-2 perplexity before recovery, after uniform LoRA, after
importance-adaptive LoRA and after importance-adaptive LoRA with distillation from the dense model, every run
with the same trainable-parameter budget and the same training tokens (the same windows, in the same order).

Training text: WikiText-2 validation (``wikitext2``); evaluation: the first --eval-windows windows of 1024 tokens
of WikiText-2 test, never trained on. Prints a markdown table; --json also keeps the numbers and loss curves and
--markdown writes the table with the command line and the wall time.

    python benchmarks/scripts/recovery.py --checkpoint out/pruned --steps 100 --threads 1
    python benchmarks/scripts/recovery.py --model llama --sparsity 0.5   # prunes first (CFSP, 128 x 1024 calibration)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
from effideploy.eval.perplexity import perplexity
from effideploy.models.build import load_model, load_tokenizer
from effideploy.models.resolve import resolve_model
from effideploy.recovery import RecoveryConfig, recover_checkpoint

RUNS = {
    "uniform": dict(uniform=True),
    "importance": dict(uniform=False),
    "importance+distill": dict(uniform=False, teacher=True),
}


def evaluate(folder: str | Path, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return perplexity(load_model(resolve_model(folder)), windows).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="A pruned checkpoint (else prune --model).")
    parser.add_argument("--model", default="llama", help="Dense model: pruned when no --checkpoint; the teacher.")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mean-rank", type=float, default=8.0, help="The budget, as the mean rank of uniform LoRA.")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16", help="Training compute dtype (evaluation is float32).")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="Keep activations instead of recomputing them (faster; same numbers).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the training windows and the LoRA init.")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--with-dense", action="store_true", help="Also evaluate the dense model.")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the recovered checkpoints here.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the table (with the command) here.")
    args = parser.parse_args()
    wall_start = time.perf_counter()
    command = "python " + shlex.join(sys.argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="effideploy-recovery-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from effideploy.pruning import PruneConfig, prune_checkpoint

        checkpoint = workdir / "pruned"
        prune_checkpoint(resolve_model(args.model), PruneConfig(sparsity=args.sparsity), checkpoint,
                         calibration=resolve_text("wikitext2"), overwrite=True)
    source = resolve_model(checkpoint)
    test_ids = tokenize_text(load_tokenizer(source), load_text(resolve_text("wikitext2", "test")))
    windows = consecutive_windows(test_ids, 1024, args.eval_windows)
    provenance = source.provenance() or {}
    calibration = provenance.get("calibration") or {}
    results: dict[str, dict] = {"meta": {
        "command": command, "checkpoint": str(checkpoint), "method": provenance.get("method"),
        "sparsity": (provenance.get("sparsity") or {}).get("ffn_actual"),
        "compensation": provenance.get("compensation"), "calibration": calibration,
        "eval": {"text": "wikitext2 test", "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])},
        "threads": torch.get_num_threads(), "args": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
    }}

    def save() -> None:
        results["meta"]["wall_seconds"] = time.perf_counter() - wall_start
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    if args.with_dense:
        results["dense"] = {"perplexity": evaluate(resolve_model(args.model).path, windows)}
        print(f"dense: {results['dense']['perplexity']:.2f}", flush=True)
    results["pruned"] = {"perplexity": evaluate(checkpoint, windows)}
    print(f"pruned, before recovery: {results['pruned']['perplexity']:.2f}", flush=True)
    save()
    for name in args.runs:
        options = dict(RUNS[name])
        teacher = args.model if options.pop("teacher", False) else None
        config = RecoveryConfig(mean_rank=args.mean_rank, steps=args.steps, batch_size=args.batch_size,
                                seqlen=args.seqlen, grad_accum=args.grad_accum, lr=args.lr, teacher=teacher,
                                distill_weight=args.distill_weight, compute_dtype=args.dtype,
                                gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, **options)
        start = time.perf_counter()
        result = recover_checkpoint(source, workdir / name, config, overwrite=True)
        record = result.record
        ppl = evaluate(workdir / name, windows)
        tail = result.log.cross_entropy[-10:]
        results[name] = {
            "perplexity": ppl, "ranks": result.plan.ranks,
            "trainable_parameters": record["budget"]["trainable_parameters"], "budget": record["budget"]["parameters"],
            "tokens": record["training"]["tokens"], "train_seconds": result.log.seconds,
            "total_seconds": time.perf_counter() - start, "stopped": result.log.stopped,
            "final_train_ce": sum(tail) / len(tail), "loss_curve": result.log.loss,
            "cross_entropy_curve": result.log.cross_entropy, "teacher": teacher,
        }
        print(f"{name}: {ppl:.2f}  ranks {min(result.plan.ranks)}..{max(result.plan.ranks)}  "
              f"{results[name]['tokens']} tokens in {result.log.seconds:.0f} s", flush=True)
        save()

    save()
    wall = results["meta"]["wall_seconds"]
    calib = (f"{calibration.get('windows')} x {calibration.get('seqlen')} tokens of {calibration.get('text')}"
             if calibration else "unknown calibration")
    lines = [
        f"Pruned checkpoint {checkpoint} ({results['meta']['method']}, FFN sparsity {results['meta']['sparsity']}, "
        f"compensation {results['meta']['compensation']}, calibration {calib}); WikiText-2 test perplexity over "
        f"{windows.shape[0]} x 1024 tokens. Recovery on WikiText-2 validation: {args.steps} steps x {args.batch_size} "
        f"x {args.seqlen} tokens (x{args.grad_accum}), lr {args.lr}, mean rank {args.mean_rank:g} budget, "
        f"{args.dtype} autocast, "
        + (f"distill weight {args.distill_weight} (dense teacher {args.model}), "
           if "importance+distill" in args.runs else "")
        + f"seed {args.seed}, {torch.get_num_threads()} thread(s).",
        "",
        "| model | LoRA ranks | trainable params | train tokens | train time | final train CE | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    if "dense" in results:
        lines.append(f"| dense | - | - | - | - | - | {results['dense']['perplexity']:.2f} |")
    lines.append(f"| pruned, no recovery | - | - | - | - | - | {results['pruned']['perplexity']:.2f} |")
    for name in args.runs:
        row = results[name]
        ranks = f"{min(row['ranks'])}..{max(row['ranks'])}"
        stopped = " (stopped: non-finite)" if row["stopped"] else ""
        lines.append(f"| {name}{stopped} | {ranks} | {row['trainable_parameters']:,} | {row['tokens']:,} | "
                     f"{row['train_seconds'] / 60:.1f} min | {row['final_train_ce']:.3f} | {row['perplexity']:.2f} |")
    lines += ["", f"Command: `{command}`; wall time {wall / 60:.1f} min."]
    print()
    print("\n".join(lines))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
