"""Is the ONNX int4 export of a CFSP-pruned SmolLM2 wrong, or was the parity tolerance too tight? Exports dense and
CFSP 10% (``--checkpoint``, default the checkpoint `tune` pruned) as int4 (rtn, accuracy_level 4); for each, the
graph's logits against the fake-quant reference on the parity prompts (41 positions) and on 4 x 256 WikiText-2 test
tokens, and the same for a copy of the graph with accuracy_level 0 (float activations). The check itself is called
as the exporter calls it and its verdict recorded ("check").

    python benchmarks/scripts/onnx_int4_parity.py --out benchmarks/results/onnx_int4_parity_2026-12-03

Measured when the gate was the as-shipped deviation (10% of the largest logit): results.json there; the exporter's
check is the float-activation one since (exporters/onnx/checks.py)."""
import argparse
import json, sys, shutil
from pathlib import Path
import numpy as np, torch, onnx

import effideploy.exporters.onnx.export as E
from effideploy.exporters.onnx import checks
from effideploy.runtimes.onnx import OnnxRuntime

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", default="/tmp/tune_rec/search/cfsp-0.1")
parser.add_argument("--out", type=Path, default=Path("out/onnx-int4-parity"))
args = parser.parse_args()
OUT = args.out; OUT.mkdir(parents=True, exist_ok=True)
results = {}
real = checks.check_quantized

def windows(source, n=4, seqlen=256):
    from effideploy.data.text import resolve_text
    from effideploy.models.build import load_tokenizer
    tok = load_tokenizer(source)
    text = next(Path("/work/shared/data/wikitext-2-raw-v1").glob("*test*"))
    ids = tok(text.read_text()[:200000]).input_ids
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]

def stats(graph_dir, fake, prompts):
    got, ref = [], []
    with OnnxRuntime(graph_dir, providers=["CPUExecutionProvider"]) as rt:
        for p in prompts:
            got.append(rt.logits([p])[0].astype(np.float32))
            with torch.no_grad():
                ref.append(fake(input_ids=torch.tensor([p])).logits[0].numpy())
    got, ref = np.concatenate(got), np.concatenate(ref)
    d = np.abs(got - ref).max(-1)
    lp = torch.log_softmax(torch.from_numpy(ref), -1); lq = torch.log_softmax(torch.from_numpy(got), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return {"max_abs": float(d.max()), "p99_pos_max": float(np.quantile(d, 0.99)), "median_pos_max": float(np.median(d)),
            "max_ref_logit": float(np.abs(ref).max()), "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "kl": kl, "positions": int(len(d)), "worst_position": int(d.argmax())}

def probe(label):
    def wrapped(folder, reference, fake, source, scheme):
        prompts = checks.parity_prompts(source, reference.config.vocab_size)
        win = windows(source)
        r = {"parity_prompts": stats(folder, fake, prompts), "wikitext": stats(folder, fake, win)}
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for node in model.graph.node:
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
        alt = OUT / "work" / f"{label}-acc0"; shutil.rmtree(alt, ignore_errors=True); shutil.copytree(folder, alt)
        onnx.save(model, str(alt / "model.onnx"))
        r["acc0_parity_prompts"] = stats(alt, fake, prompts); r["acc0_wikitext"] = stats(alt, fake, win)
        results[label] = r
        print(label, json.dumps(r, indent=1), flush=True)
        try:
            record = real(folder, reference, fake, source, scheme); r["check"] = "pass"
            return record
        except Exception as exc:
            r["check"] = str(exc)
            raise
    return wrapped

for label, model in (("dense", "llama"), ("cfsp-0.1", args.checkpoint)):
    E.check_quantized = probe(label)
    try:
        E.export_onnx(model, OUT / "work" / label, quantize="int4", overwrite=True)
    except Exception as exc:
        print(label, "export:", type(exc).__name__, exc)
(OUT / "results.json").write_text(json.dumps(results, indent=1))
