"""Recovery evidence on pruned checkpoints: each one before and after distillation from the dense model at several
training-token budgets, against plain LoRA with uniform ranks at the same budgets, and the dense model given the same
plain training (the control for perplexity on related text).

Per model: the zero-shot suite (lm-eval 0.4.13's seven tasks, seeded items, effideploy's scorer in PyTorch float32;
the same items and scorer as ``zeroshot_table.py``, whose ONNX and lm-eval numbers agree with it item for item),
KL(dense || model), top-1 agreement (loyalty's next-token part) and top-5 overlap on held-out WikiText-2 *test*
windows, WikiText-2 test perplexity on the same windows, and the seconds training took.

The runs are the search's own recovery lever (``effideploy.search.recovery_lever.Recovery``): ``distil:N`` is KL to
the dense model only (weight 1.0), importance-adaptive LoRA ranks, mean rank 8, N // 512 steps of 2 x 256 tokens;
``lora-uniform:N`` the same budget and windows with uniform ranks and the plain next-token loss. Training text:
WikiText-2 *validation* (what calibration reads), never the test split or a task's items.

    python benchmarks/scripts/recovery_grid.py --pruned cfsp-0.3=/tmp/zeroshot_table/ckpt/cfsp-0.3 \
        --budgets 16k 64k --json benchmarks/results/recovery_grid.json

Recovered checkpoints are kept under ``--work`` and reused by the lever's own content check; the JSON is rewritten
after every model, and ``--resume`` keeps the models it already holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zeroshot_table import SHORT, metric_row, paired_difference, summary  # noqa: E402  (the same table code)

METHODS = ("distil", "lora-uniform")


def recover(method: str, tokens: int, pruned: Path, folder: Path, dense, data_dir) -> dict:
    """Train ``pruned`` into ``folder`` as the search's lever does (``lora-uniform``: its lora config, uniform)."""
    from effideploy.bench.artifacts import content_fingerprint
    from effideploy.checkpoint.writer import read_provenance
    from effideploy.recovery import recover_checkpoint
    from effideploy.search.recovery_lever import Recovery

    lever = Recovery()
    if method == "distil":
        config = lever.recovery_config(f"distil:{tokens}", str(dense.path), data_dir)
    else:
        config = dataclasses.replace(lever.recovery_config(f"lora:{tokens}", str(dense.path), data_dir), uniform=True)
    label = f"{pruned} (content {content_fingerprint(pruned)})"
    record = (read_provenance(folder) or {}).get("recovery") if folder.is_dir() else None
    wanted = {k: v for k, v in config.to_dict().items() if k != "compute_dtype"}
    if not (record and record.get("input") == label
            and {k: v for k, v in record["config"].items() if k != "compute_dtype"} == wanted):
        recover_checkpoint(pruned, folder, config, overwrite=True, input_label=label)
        record = read_provenance(folder)["recovery"]
    training = record["training"]
    return {"tokens": training["tokens"], "steps": training["steps"], "train_seconds": training["seconds"],
            "rule": record["rule"], "ranks": [b["rank"] for b in record["blocks"]],
            "final_loss": (record.get("loss_curve") or [None])[-1]}


def evaluate(path: Path, tokenizer, tasks: dict, screener, args) -> dict:
    from effideploy.eval.multiple_choice import evaluate_task
    from effideploy.models.build import load_model
    from effideploy.models.resolve import resolve_model
    from effideploy.runtimes.pytorch import TorchRuntime

    tick = time.perf_counter()
    model = load_model(resolve_model(path)).eval()
    runtime = TorchRuntime(model=model)
    rows = {name: metric_row(task, evaluate_task(runtime, tokenizer, task, limit=args.limit, seed=args.seed))
            for name, task in tasks.items()}
    screen = screener.screen(model, label=path.name)
    return {"tasks": rows, "summary": summary(rows, args.competent), "perplexity": screen.perplexity,
            "kl": screen.kl, "top1_agreement": screen.top1_agreement, "top5_overlap": screen.top_k_agreement,
            "eval_seconds": time.perf_counter() - tick}


def budget_tokens(text: str) -> int:
    from effideploy.search.recovery_lever import Recovery

    return Recovery.parse(f"distil:{text}")[1]


def markdown(record: dict) -> str:
    names = list(record["metrics"])
    lines = ["| model | training | tokens | train time | suite mean | competent mean | paired diff vs dense "
             "(competent) | KL (nats) | top-1 | top-5 | PPL |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    bases = list(dict.fromkeys(m["base"] for m in record["models"].values()))
    rows = sorted(record["models"].items(),  # each checkpoint's rows together: untrained, then by method and budget
                  key=lambda kv: (bases.index(kv[1]["base"]), kv[1]["method"] or "", kv[1].get("tokens") or 0))
    for label, m in rows:
        s, p = m["summary"], m.get("paired_vs_dense")
        lines.append(
            f"| {m['base']} | {m['method'] or '-'} | {m.get('tokens') or '-'} | "
            + (f"{m['train_seconds'] / 60:.1f} min" if m.get("train_seconds") else "-")
            + f" | {s['mean']:.3f} ± {s['mean_stderr']:.3f} | {s['mean_competent']:.3f} ± "
              f"{s['mean_competent_stderr']:.3f} | " + (f"{p['difference']:+.3f} ± {p['stderr']:.3f}" if p else "-")
            + f" | {m['kl']:.4f} | {m['top1_agreement']:.3f} | {m['top5_overlap']:.3f} | {m['perplexity']:.2f} |")
    lines += ["", "| model | " + " | ".join(SHORT[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(f"{m['tasks'][n][m['tasks'][n]['metric']]:.3f}" for n in names)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama", help="The dense model: the teacher and the control.")
    parser.add_argument("--pruned", nargs="+", required=True, metavar="LABEL=PATH", help="Pruned checkpoints.")
    parser.add_argument("--budgets", nargs="+", default=["16k", "64k"], help="Training tokens (N or Nk).")
    parser.add_argument("--baseline-budgets", nargs="+", default=None,
                        help="Budgets of the lora-uniform baseline (default: the largest of --budgets).")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-dense-control", dest="dense_control", action="store_false",
                        help="Skip the dense model given lora-uniform at the largest baseline budget.")
    parser.add_argument("--limit", type=int, default=100, help="Items per task (seeded subset).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=8, help="Held-out WikiText-2 test windows (KL, PPL).")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work", type=Path, default=Path("/tmp/recovery_grid"))
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--resume", action="store_true", help="Keep the models --json already holds.")
    args = parser.parse_args()
    pruned = {}
    for item in args.pruned:
        label, _, path = item.partition("=")
        if not path or not (Path(path) / "config.json").is_file():
            parser.error(f"--pruned {item!r}: give LABEL=PATH of a pruned checkpoint folder")
        pruned[label] = Path(path)
    budgets = [budget_tokens(b) for b in args.budgets]
    baseline = [budget_tokens(b) for b in args.baseline_budgets] if args.baseline_budgets else [max(budgets)]
    if args.threads:
        torch.set_num_threads(args.threads)

    from effideploy.bench.environment import environment, load_average
    from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
    from effideploy.eval import zeroshot
    from effideploy.eval.multiple_choice import load_suite_task
    from effideploy.models.build import load_model, load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.search.recovery_lever import _tokens_text as tokens_text  # 65536 -> 64k, as recipe labels read
    from effideploy.search.screen import Screener

    started = time.perf_counter()
    dense = resolve_model(args.model)
    tokenizer = load_tokenizer(dense)
    tasks = {name: load_suite_task(name) for name in zeroshot.SEVEN}
    args.competent = ["piqa", "hellaswag", "arc_easy"]  # the tasks SmolLM2-135M is competent on (docs/accuracy.md)
    ids = tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "test", args.data_dir)))
    windows = consecutive_windows(ids, args.seqlen, args.windows)
    with torch.no_grad():
        screener = Screener(load_model(dense).eval(), windows)
    record = {"command": "python " + shlex.join(sys.argv), "model": args.model, "threads": torch.get_num_threads(),
              "cpu": environment()["cpu"], "limit": args.limit, "seed": args.seed, "competent": args.competent,
              "metrics": {n: t.metric for n, t in tasks.items()},
              "held_out": f"wikitext2 test, first {args.windows} windows of {args.seqlen} tokens",
              "training_text": "wikitext2 validation (2 x 256-token windows, seed 0)", "models": {}}
    if args.resume and args.json.is_file():
        old = json.loads(args.json.read_text())
        if old.get("limit") == args.limit and old.get("held_out") == record["held_out"]:
            record["models"] = old["models"]
            # Every invocation that made a row, in order (a later one may ask for other budgets).
            record["commands"] = old.get("commands", [old["command"]]) + [record["command"]]

    # The control first, then one pruned checkpoint at a time, so that a run cut short keeps whole rows.
    plan = [("dense", "dense", dense.path, None, None)]
    if args.dense_control:
        plan.append((f"dense+lora-uniform:{tokens_text(max(baseline))}", "dense", dense.path, "lora-uniform",
                     max(baseline)))
    for label, path in pruned.items():
        plan.append((label, label, path, None, None))
        plan += [(f"{label}+{method}:{tokens_text(t)}", label, path, method, t)
                 for method, amounts in (("distil", budgets), ("lora-uniform", baseline)) if method in args.methods
                 for t in amounts]
    for label, base, path, method, tokens in plan:
        if label in record["models"]:
            continue
        entry = {"base": base, "method": method}
        target = Path(path)
        if method is not None:
            target = args.work / label.replace(":", "-").replace("+", "-")
            print(f"[{time.strftime('%H:%M:%S')}] training {label}", flush=True)
            entry.update(recover(method, tokens, Path(path), target, dense, args.data_dir))
        print(f"[{time.strftime('%H:%M:%S')}] evaluating {label}", flush=True)
        with torch.no_grad():
            entry.update(evaluate(target, tokenizer, tasks, screener, args))
        if "dense" in record["models"]:
            entry["paired_vs_dense"] = paired_difference(entry["tasks"], record["models"]["dense"]["tasks"],
                                                         args.competent)
        record["models"][label] = entry
        record["seconds"] = time.perf_counter() - started
        record["load_average"] = load_average()
        args.json.write_text(json.dumps(record, indent=1))
        s = entry["summary"]
        print(f"  {label}: competent {s['mean_competent']:.3f}, mean {s['mean']:.3f}, KL {entry['kl']:.4f}, "
              f"top-1 {entry['top1_agreement']:.3f}, PPL {entry['perplexity']:.2f}", flush=True)
    table = markdown(record)
    print(table)
    if args.markdown:
        commands = "; then ".join(f"`{c}`" for c in record.get("commands", [record["command"]]))
        args.markdown.write_text(f"Commands: {commands}. {record['cpu']}, {record['threads']} threads; the last "
                                 f"invocation {record['seconds'] / 60:.1f} min.\n\n{table}\n")


if __name__ == "__main__":
    main()
