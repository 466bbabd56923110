"""Safety of users' files and clean failure on every bad input (issue 11; guarantees in docs/safety.md).

The table drives each hostile or broken input through the real command line in a subprocess and asserts: the exit
code, exactly one non-empty stderr line ``error: ...`` naming the problem, every input byte-identical afterwards
and nothing written anywhere (no output, no parent folder, no scratch folder: the whole test folder is unchanged).
Reader-level cases and the fuzz test call the library in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from effideploy.errors import EffideployError
from tests.conftest import default_sigint
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------ helpers

def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders`` -> its content hash ("dir" for folders, the target for links)."""
    state = {}
    for folder in folders:
        folder = Path(folder)
        if not os.path.lexists(folder):  # a dangling link is recorded as a link below, not as absent
            state[str(folder)] = "absent"
            continue
        for path in sorted([folder, *folder.rglob("*")]):
            if path.is_symlink():
                state[str(path)] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[str(path)] = "dir"
            else:
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def error_lines(stderr: str) -> list[str]:
    """stderr's lines, less the memory plan prune prints before calibrating (information, not the error)."""
    lines, in_plan = [], False
    for line in stderr.splitlines():
        in_plan = line.startswith("memory plan (") or (in_plan and line.startswith("  "))
        if line.strip() and not in_plan:
            lines.append(line)
    return lines


def assert_one_error(code: int, stderr: str, expected_code: int, fragment: str) -> None:
    lines = error_lines(stderr)
    assert code == expected_code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(fragment, lines[0]), lines[0]


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_header(path: Path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def rewrite_safetensors(folder: Path, change) -> None:
    """Load the folder's single model.safetensors, let ``change`` edit the dict, save it back."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path: Path, change) -> None:
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_model_dir, calib_file):
    """A tiny pruned checkpoint (read-only: cases copy it before changing it)."""
    from effideploy.data.text import TextSpec
    from effideploy.models.resolve import resolve_model
    from effideploy.pruning import PruneConfig, prune_checkpoint

    folder = tmp_path_factory.mktemp("safety-pruned") / "checkpoint"
    spec = TextSpec(name=str(calib_file), path=str(calib_file), split="calibration")
    prune_checkpoint(resolve_model(tiny_model_dir), PruneConfig(sparsity=0.5, calib_samples=2, calib_seqlen=32),
                     folder, calibration=spec)
    return folder


# --------------------------------------------------------------------------------------------- the CLI table

@dataclass
class Ctx:
    tmp: Path
    model: Path
    pruned: Path
    calib: Path


@dataclass
class Case:
    args: list
    fragment: str
    code: int = 2
    cwd: Path | None = None
    env: dict = field(default_factory=dict)


QUICK_PRUNE = ["--calib-samples", "2", "--calib-seqlen", "32"]
QUICK_BENCH = ["--no-memory", "--repeats", "1", "--ppl-windows", "0", "--mc-limit", "0", "--throughput-repeats", "0"]


def _bench_output_is_candidate(c: Ctx) -> Case:
    cand = copy_model(c.pruned, c.tmp / "cand")
    return Case(["bench", "--model", c.model, "--candidate", cand, "--output", cand, "--overwrite", *QUICK_BENCH],
                "overlaps the input")


def _bench_output_is_parent_of_model(c: Ctx) -> Case:
    models = c.tmp / "models"
    models.mkdir()
    dense, cand = copy_model(c.model, models / "dense"), copy_model(c.pruned, models / "cand")
    return Case(["bench", "--model", dense, "--candidate", cand, "--output", models, "--overwrite", *QUICK_BENCH],
                "overlaps the input")


def _bench_policy_inside_output(c: Ctx) -> Case:
    report = c.tmp / "report"
    report.mkdir()
    for name in ("report.json", "report.md"):  # an earlier report: replaceable, but not while it holds an input
        (report / name).write_text("{}")
    (report / "policy.toml").write_text('name = "mine"\n[thresholds]\nmin_op = 0.5\n')
    return Case(["bench", "--model", c.model, "--candidate", c.pruned, "--policy", report / "policy.toml",
                 "--output", report, "--overwrite", *QUICK_BENCH], "overlaps the input")


def _bench_empty_token_compression(c: Ctx) -> Case:
    return Case(["bench", "--model", c.model, "--token-compression", "", "--output", c.tmp / "rep", *QUICK_BENCH],
                "--token-compression is empty")


def _bench_policy_not_utf8(c: Ctx) -> Case:
    policy = c.tmp / "policy.toml"
    policy.write_bytes(b'name = "caf\xe9"\n')
    return Case(["bench", "--model", c.model, "--candidate", c.pruned, "--policy", policy, "--output",
                 c.tmp / "rep"], "policy file .* is not UTF-8")


def _bench_malformed_export_manifest(c: Ctx) -> Case:
    export = copy_model(c.pruned, c.tmp / "export")
    (export / "effideploy_export.json").write_text('{"runtime": "torch", ')
    return Case(["bench", "--model", c.model, "--candidate", export, "--output", c.tmp / "rep", *QUICK_BENCH],
                "export manifest .* is not valid JSON")


def _prune_output_dot_overwrite(c: Ctx) -> Case:
    project = c.tmp / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('precious')\n")
    (project / "README.md").write_text("mine\n")
    return Case(["prune", "--model", c.model, "--calib", c.calib, *QUICK_PRUNE, "--output", ".", "--overwrite"],
                "was not written by effideploy", cwd=project)


def _prune_calib_inside_output(c: Ctx) -> Case:
    old = c.tmp / "old"
    old.mkdir()
    for name in ("effideploy.json", "config.json"):  # an earlier checkpoint, replaceable with --overwrite ...
        (old / name).write_text("{}")
    shutil.copy(c.calib, old / "calib.txt")  # ... but not while it holds this run's calibration text
    return Case(["prune", "--model", c.model, "--calib", old / "calib.txt", *QUICK_PRUNE, "--output", old,
                 "--overwrite"], "overlaps the input")


def _prune_output_parent_is_file(c: Ctx) -> Case:
    (c.tmp / "notes.txt").write_text("a file")
    return Case(["prune", "--model", c.model, "--calib", c.calib, *QUICK_PRUNE, "--output",
                 c.tmp / "notes.txt" / "out"], "is a file, not a folder")


def _prune_calib_not_utf8_nested_output(c: Ctx) -> Case:
    text = c.tmp / "calib.txt"
    text.write_bytes(b"plain words " * 50 + b"\xff\xfe broken " * 10)
    # the parents a/b/ must not be created (nor left behind) by a run that fails
    return Case(["prune", "--model", c.model, "--calib", text, *QUICK_PRUNE, "--output", c.tmp / "a" / "b" / "out"],
                "text file .*calib.txt is not UTF-8")


def _prune_safetensors_random_bytes(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    (model / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], "is not a safetensors file")


def _prune_safetensors_missing_dtype(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    write_header(model / "model.safetensors", {"model.norm.weight": {"shape": [128], "data_offsets": [0, 512]}},
                 b"\0" * 512)
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], "has no dtype")


def _prune_truncated_shard(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], "is truncated")


def _prune_missing_tensor(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    rewrite_safetensors(model, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], "model.layers.2.mlp.up_proj.weight is missing")


def _prune_weights_disagree_with_config(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    edit_json(model / "config.json", lambda d: d.update(intermediate_size=300))
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], r"has shape \[256, 128\], but config.json")


def _prune_config_not_object(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    (model / "config.json").write_text("[1, 2, 3]")
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], "must hold an object, not list")


def _prune_config_wrong_type(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    edit_json(model / "config.json", lambda d: d.update(hidden_size="128"))
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], "hidden_size must be a positive integer")


def _prune_config_not_utf8(c: Ctx) -> Case:
    model = copy_model(c.model, c.tmp / "model")
    (model / "config.json").write_bytes(b'{"model_type": "llama\xc3"}')
    return Case(["prune", "--model", model, "--output", c.tmp / "out"], "config.json is not UTF-8")


def _absurd_config(c: Ctx, **fields) -> Path:
    """A copy of the tiny model (valid weights) whose ~700-byte config.json claims ``fields``."""
    model = copy_model(c.model, c.tmp / "model")
    edit_json(model / "config.json", lambda d: d.update(fields))
    return model


# Sizes no checkpoint of these weights has: each is refused against the weight headers (or, 1e9 being a JSON
# float, as a type) before anything is built per layer; ABSURD_SIZES runs them again under a memory limit.
ABSURD_SIZES = {
    "num_hidden_layers": (10**9, "config.json says num_hidden_layers 1000000000, but the weights hold 4 blocks"),
    "num_hidden_layers_float": (1e9, "num_hidden_layers must be a positive integer, got 1000000000.0"),
    "hidden_size": (10**9, r"embed_tokens.weight has shape \[384, 128\], but config.json implies \[384, 1000000000\]"),
    "intermediate_size": (10**9, r"gate_proj.weight has shape \[256, 128\], but config.json implies \[1000000000, 128\]"),
    "vocab_size": (10**12, r"has shape \[384, 128\], but config.json implies \[1000000000000, 128\]"),
}


def _absurd_case(field_name: str):
    def build(c: Ctx) -> Case:
        value, fragment = ABSURD_SIZES[field_name]
        model = _absurd_config(c, **{field_name.removesuffix("_float"): value})
        return Case(["prune", "--model", model, "--calib", c.calib, *QUICK_PRUNE, "--output", c.tmp / "out"], fragment)
    return build


for _field in ABSURD_SIZES:
    globals()[f"_prune_config_absurd_{_field}"] = _absurd_case(_field)


def _prune_pickle_config_beyond_its_files(c: Ctx) -> Case:
    model = c.tmp / "pickled"
    model.mkdir()
    shutil.copy(c.model / "config.json", model)
    edit_json(model / "config.json", lambda d: d.update(num_hidden_layers=10**9))
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({}))  # never loaded: refused by its size first
    return Case(["prune", "--model", model, "--allow-pickle", "--output", c.tmp / "out"],
                "describes [0-9]+ parameters, but its weight files hold [0-9]+ bytes",
                env={"EFFIDEPLOY_CACHE": str(c.tmp / "cache")})


def tiny_gguf(model: Path, path: Path) -> Path:
    """The tiny model as a float32 GGUF (effideploy's own writer, no llama.cpp needed)."""
    from effideploy.exporters.llamacpp.gguf import write_gguf

    write_gguf(model, json.loads((model / "config.json").read_text()), path, dtype="float32", name="tiny")
    return path


def set_gguf_u32(path: Path, key: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key)
    assert struct.unpack("<I", data[at:at + 4])[0] == 4  # a uint32 value follows
    data[at + 4:at + 8] = struct.pack("<I", value)
    path.write_bytes(bytes(data))


def _prune_gguf_garbage_after_magic(c: Ctx) -> Case:
    path = c.tmp / "model.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + random.Random(0).randbytes(500))
    return Case(["prune", "--model", path, "--calib", c.calib, *QUICK_PRUNE, "--output", c.tmp / "out"],
                "model.gguf is not a valid GGUF file: it claims [0-9]+ metadata entries",
                env={"EFFIDEPLOY_CACHE": str(c.tmp / "cache")})


def _prune_gguf_block_count_beyond_tensors(c: Ctx) -> Case:
    path = tiny_gguf(c.model, c.tmp / "model.gguf")
    set_gguf_u32(path, "llama.block_count", 10**9)
    return Case(["prune", "--model", path, "--calib", c.calib, *QUICK_PRUNE, "--output", c.tmp / "out"],
                "model.gguf is not a valid GGUF file: llama.block_count is 1000000000, but the tensors hold 4 blocks",
                env={"EFFIDEPLOY_CACHE": str(c.tmp / "cache")})


def _prune_count_with_a_width_method(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--method", "cfsp", "--count", "1", "--output", c.tmp / "out"],
                r"--count does not apply to --method cfsp \(it prunes FFN channels by --sparsity\); --count is for "
                "drop-blocks, drop-attention$")


def _prune_target_speedup_with_a_width_method(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--method", "flap", "--target-speedup", "1.5", "--output",
                 c.tmp / "out"], "--target-speedup does not apply to --method flap .*; --target-speedup is for "
                                 "drop-blocks, drop-attention, cfsp-joint$")


def _prune_count_with_cfsp_joint(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--method", "cfsp-joint", "--count", "1", "--output", c.tmp / "out"],
                "--count does not apply to --method cfsp-joint; --count is for drop-blocks, drop-attention$")


def _prune_depth_method_without_a_size(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--method", "drop-blocks", "--output", c.tmp / "out"],
                "drop-blocks needs how much to remove: give --count, --target-params or --target-speedup$")


def _prune_cfsp_joint_without_a_target(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--method", "cfsp-joint", "--output", c.tmp / "out"],
                "cfsp-joint needs a size target: give --target-params or --target-speedup$")


def _prune_two_size_options(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--method", "drop-attention", "--count", "1", "--target-params", "0.1",
                 "--output", c.tmp / "out"], "--count and --target-params were given together; drop-attention takes "
                                             "one of --count, --target-params or --target-speedup$")


def _prune_count_beyond_the_blocks(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--method", "drop-blocks", "--count", "9", "--calib", c.calib,
                 *QUICK_PRUNE, "--output", c.tmp / "out"],
                "--count 9 is more than the 3 .*from 4 blocks$")


def _export_empty_quantize(c: Ctx) -> Case:
    return Case(["export", c.pruned, "--runtime", "llamacpp", "--quantize", "", "--no-verify", "--output",
                 c.tmp / "out"], "--quantize is empty")


def _export_blank_quant_method(c: Ctx) -> Case:
    return Case(["export", c.pruned, "--runtime", "onnx", "--quantize", "int8", "--quant-method", " ", "--no-verify",
                 "--output", c.tmp / "out"], "--quant-method is empty")


def _prune_threads_negative(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--threads", "-1", "--output", c.tmp / "out"], "--threads must be at least 1")


def _prune_bad_number(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--sparsity", "half", "--output", c.tmp / "out"], "Invalid value for '--sparsity'")


def _prune_hostile_pickle(c: Ctx) -> Case:
    model = c.tmp / "pickled"
    model.mkdir()
    shutil.copy(c.model / "config.json", model)
    sentinel = c.tmp / "PWNED"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    # padded to the parameter count's bytes, so the size bound passes and torch.load itself is what refuses it
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Hostile(), "pad": bytes(2**20)}))
    return Case(["prune", "--model", model, "--allow-pickle", "--output", c.tmp / "out"],
                "cannot load the pickled weights", env={"EFFIDEPLOY_CACHE": str(c.tmp / "cache")})


def _prune_align_wider_than_ffn(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--calib", c.calib, *QUICK_PRUNE, "--align", "1000", "--output",
                 c.tmp / "out"], "--align 1000 is not smaller than the narrowest FFN width 256")


def _prune_a_nan(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--a", "nan", "--output", c.tmp / "out"], "--a must be a finite number")


def _prune_calib_seqlen_beyond_positions(c: Ctx) -> Case:
    return Case(["prune", "--model", c.model, "--calib", c.calib, "--calib-samples", "2", "--calib-seqlen", "4096",
                 "--output", c.tmp / "out"], "--calib-seqlen 4096 exceeds the model's max_position_embeddings 512")


def _eval_seqlen_one(c: Ctx) -> Case:
    return Case(["eval", "ppl", c.model, "--text", c.calib, "--seqlen", "1"], "--seqlen must be at least 2 tokens")


def _eval_seqlen_beyond_positions(c: Ctx) -> Case:
    return Case(["eval", "ppl", c.model, "--text", c.calib, "--seqlen", "100000"], "exceeds the model's max_position")


def _export_weight_map_traversal(c: Ctx) -> Case:
    model = copy_model(c.pruned, c.tmp / "model")
    (c.tmp / "victim.safetensors").write_bytes(b"users' own file")
    index = model / "model.safetensors.index.json"
    edit_json(index, lambda d: d["weight_map"].update({"model.norm.weight": "../../victim.safetensors"}))
    return Case(["export", model, "--runtime", "vllm", "--no-verify", "--output", c.tmp / "out"],
                "weight_map file '../../victim.safetensors' .* is not a plain file name")


def _export_malformed_provenance(c: Ctx) -> Case:
    model = copy_model(c.pruned, c.tmp / "model")
    (model / "effideploy.json").write_text('{"method": "cfsp",')
    return Case(["export", model, "--runtime", "vllm", "--no-verify", "--output", c.tmp / "out"],
                "provenance file .*effideploy.json is not valid JSON")


def _export_empty_token_compression(c: Ctx) -> Case:
    return Case(["export", c.pruned, "--runtime", "vllm", "--no-verify", "--token-compression", " ", "--output",
                 c.tmp / "out"], "--token-compression is empty")


def _eval_windows_zero(c: Ctx) -> Case:
    return Case(["eval", "ppl", c.model, "--text", c.calib, "--seqlen", "32", "--windows", "0"],
                "--windows must be at least 1")


def _run_policy_inside_report(c: Ctx) -> Case:
    report = c.tmp / "run" / "report"
    report.mkdir(parents=True)
    (report / "gate.toml").write_text('[thresholds]\nmin_op = 0.5\n')
    return Case(["run", "--model", c.model, "--policy", report / "gate.toml", "--output", c.tmp / "run", "--quick"],
                "overlaps the input")


def _recover_data_not_utf8(c: Ctx) -> Case:
    data = c.tmp / "train.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "\xc0\xaf"}\n')
    return Case(["recover", c.pruned, "--data", data, "--steps", "1", "--seqlen", "32", "--output", c.tmp / "out"],
                "text file .*train.jsonl is not UTF-8")


def _recover_seqlen_beyond_positions(c: Ctx) -> Case:
    return Case(["recover", c.pruned, "--data", c.calib, "--steps", "1", "--seqlen", "4096", "--output",
                 c.tmp / "out"], "--seqlen 4096 exceeds")


CASES = {name[1:]: builder for name, builder in sorted(globals().items())
         if name.startswith(("_bench_", "_prune_", "_eval_", "_export_", "_recover_", "_run_")) and callable(builder)}

# Each case runs ``effideploy.cli.main(args)`` -- what ``python -m effideploy`` runs -- in its own process, forked
# from one driver process that imported effideploy, torch and transformers once: the imports cost ~5 s per fresh
# interpreter on a loaded CI machine, the cases themselves well under a second each. (A few cases below also run
# through a fresh ``python -m effideploy`` to cover the entry point itself.)
DRIVER = r"""
import json, os, sys
os.environ["EFFIDEPLOY_PROGRESS"] = "0"
import torch, transformers, safetensors, typer  # noqa: F401 - imported once, shared by every forked case
import effideploy.cli as cli
import effideploy.models.build, effideploy.pruning, effideploy.data.text  # noqa: F401
cases = json.load(open(sys.argv[1]))
codes = []
for case in cases:
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.chdir(case["cwd"])
            os.environ.update(case["env"])
            os.dup2(os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = ["effideploy", *case["args"]]
            cli.main(case["args"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
json.dump(codes, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model_dir, pruned_dir, calib_file):
    """Build every case in its own folder, snapshot, run them all, and return name -> (case, code, stderr, ok)."""
    shared = (tiny_model_dir, pruned_dir, calib_file.parent)
    work = tmp_path_factory.mktemp("safety-driver")
    built, payload = {}, []
    for name, builder in CASES.items():
        tmp = tmp_path_factory.mktemp(name)
        case = builder(Ctx(tmp=tmp, model=tiny_model_dir, pruned=pruned_dir, calib=calib_file))
        built[name] = (case, tmp, snapshot(tmp))
        payload.append({"args": [str(a) for a in case.args], "cwd": str(case.cwd or tmp), "env": case.env,
                        "stderr": str(work / f"{name}.err")})
    before_shared = snapshot(*shared)
    (work / "cases.json").write_text(json.dumps(payload))
    subprocess.run([sys.executable, "-c", DRIVER, work / "cases.json", work / "codes.json"], check=True,
                   env={**os.environ, "EFFIDEPLOY_PROGRESS": "0"}, timeout=900)
    codes = json.loads((work / "codes.json").read_text())
    shared_ok = snapshot(*shared) == before_shared
    return {name: (case, code, (work / f"{name}.err").read_text(), snapshot(tmp) == before, shared_ok)
            for (name, (case, tmp, before)), code in zip(built.items(), codes)}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(name, table):
    case, code, err, unchanged, shared_unchanged = table[name]
    assert_one_error(code, err, case.code, case.fragment)
    # inputs byte-identical, and nothing written anywhere: no output, parent, partial or scratch folder
    assert unchanged, f"{name}: files changed in its folder"
    assert shared_unchanged, "a shared input changed"


@pytest.mark.parametrize("name", ["prune_threads_negative", "prune_config_not_utf8", "bench_output_is_candidate"])
def test_the_entry_point_itself(name, tmp_path, tiny_model_dir, pruned_dir, calib_file):
    """The same through a fresh ``python -m effideploy`` (the table forks from one interpreter)."""
    case = CASES[name](Ctx(tmp=tmp_path, model=tiny_model_dir, pruned=pruned_dir, calib=calib_file))
    before = snapshot(tmp_path, tiny_model_dir, pruned_dir)
    code, _, err = run_cli(*case.args, cwd=case.cwd, env=case.env)
    assert_one_error(code, err, case.code, case.fragment)
    assert snapshot(tmp_path, tiny_model_dir, pruned_dir) == before


MEMORY_LIMIT = 3 * 2**30  # address space: the interpreter with torch and transformers imported needs ~2 GiB


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_absurd_sizes_fail_in_seconds_under_a_memory_limit(tmp_path_factory, tiny_model_dir, pruned_dir, calib_file):
    """A config.json (or GGUF metadata) claiming 10^9 layers or 10^9-wide matrices, with otherwise valid tiny
    weights, under a 3 GiB address-space limit and a 60 s timeout: one ``error:`` line and exit 2. (Before the
    config-versus-tensors check, ``prune`` grew until the kernel killed it, or under a limit ended in
    "internal error (IndexError)".) The cases run forked from one driver, which carries the limit; one runs through
    a fresh ``python -m effideploy`` too."""
    names = [name for name in CASES if name.startswith(("prune_config_absurd_", "prune_gguf_block_count",
                                                        "prune_pickle_config_beyond"))]
    assert len(names) == len(ABSURD_SIZES) + 2
    work = tmp_path_factory.mktemp("absurd-driver")
    payload = []
    for name in names:
        tmp = tmp_path_factory.mktemp(name)
        case = CASES[name](Ctx(tmp=tmp, model=tiny_model_dir, pruned=pruned_dir, calib=calib_file))
        payload.append({"args": [str(a) for a in case.args], "cwd": str(tmp), "env": case.env,
                        "stderr": str(work / f"{name}.err"), "fragment": case.fragment})
    (work / "cases.json").write_text(json.dumps(payload))
    subprocess.run([sys.executable, "-c", DRIVER, work / "cases.json", work / "codes.json"], check=True,
                   env={**os.environ, "EFFIDEPLOY_PROGRESS": "0"}, timeout=60, preexec_fn=_limit_memory)
    for case, code in zip(payload, json.loads((work / "codes.json").read_text())):
        assert_one_error(code, Path(case["stderr"]).read_text(), 2, case["fragment"])
    fresh = payload[names.index("prune_config_absurd_num_hidden_layers")]
    result = subprocess.run([sys.executable, "-m", "effideploy", *fresh["args"]], cwd=fresh["cwd"],
                            capture_output=True, text=True, env={**os.environ, "EFFIDEPLOY_PROGRESS": "0"},
                            timeout=60, preexec_fn=_limit_memory)
    assert_one_error(result.returncode, result.stderr, 2, fresh["fragment"])


def test_gguf_loading_draws_no_progress_bars_when_progress_is_off(tmp_path, tiny_model_dir, calib_file):
    """transformers' GGUF reader draws tqdm bars of its own; under EFFIDEPLOY_PROGRESS=0 stderr stays empty."""
    path = tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    code, out, err = run_cli("eval", "ppl", path, "--text", calib_file, "--seqlen", "32", "--windows", "1",
                             env={"EFFIDEPLOY_CACHE": str(tmp_path / "cache")})
    assert code == 0, err
    assert "perplexity" in out + err
    assert not re.search(r"it/s|%\||\r|de-quantizing|Loading weights", err), err


def test_quiet_libraries_silences_plain_tqdm_only_inside(monkeypatch):
    import io

    from tqdm.auto import tqdm

    from effideploy import progress

    def drawn() -> str:
        stream = io.StringIO()
        for _ in tqdm(range(3), file=stream, desc="bar"):
            pass
        return stream.getvalue()

    monkeypatch.setenv("EFFIDEPLOY_PROGRESS", "0")
    assert "bar" in drawn()  # tqdm on its own draws, whatever effideploy's switch says
    with progress.quiet_libraries():
        assert drawn() == ""
    assert "bar" in drawn()  # restored
    monkeypatch.setenv("EFFIDEPLOY_PROGRESS", "1")
    with progress.quiet_libraries():  # progress on: left alone
        assert "bar" in drawn()


# ------------------------------------------------------------------------------------ CLI runs that succeed

def test_foreign_auto_map_is_never_carried_or_run(tmp_path, tiny_model_dir, calib_file):
    """A model whose config and tokenizer config name remote code: prune and export run no code and carry none."""
    model = copy_model(tiny_model_dir, tmp_path / "model")
    sentinel = tmp_path / "PWNED"
    (model / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    edit_json(model / "config.json", lambda d: d.update(auto_map={"AutoModelForCausalLM": "evil.Model",
                                                                  "AutoConfig": "someone/else--evil.Config"}))
    edit_json(model / "tokenizer_config.json", lambda d: d.update(auto_map={"AutoTokenizer": ["evil.Tok", None]}))
    before = snapshot(model)
    code, _, err = run_cli("prune", "--model", model, "--calib", calib_file, *QUICK_PRUNE, "--output", tmp_path / "pruned")
    assert code == 0, err
    code, _, err = run_cli("export", model, "--runtime", "vllm", "--no-verify", "--output", tmp_path / "export")
    assert code == 0, err
    assert snapshot(model) == before and not sentinel.exists()
    from effideploy.checkpoint.config import AUTO_MAP

    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert "auto_map" not in json.loads((tmp_path / "export" / "config.json").read_text())
    for folder in ("pruned", "export"):
        assert "auto_map" not in json.loads((tmp_path / folder / "tokenizer_config.json").read_text())
        assert (tmp_path / folder / ".effideploy-output").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model", "pruned"]


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_sigkill_leftovers_are_cleaned_and_ctrl_c_writes_nothing(tmp_path, tiny_model_dir, calib_file):
    """A killed run leaves scratch folders named with its PID; the next run beside them removes them. Ctrl-C exits
    130 with one line and leaves nothing. The Ctrl-C run is stopped (SIGSTOP) the moment its scratch folder appears
    and signalled while stopped, so a fast machine cannot finish the prune before the signal lands."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "effideploy", "prune", "--model", str(tiny_model_dir), "--calib", str(calib_file),
            "--calib-samples", "64", "--calib-seqlen", "256", "--batch-size", "1", "--threads", "1", "--output", str(out)]
    env = {**os.environ, "EFFIDEPLOY_PROGRESS": "0"}

    def scratch():
        return [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    killed = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: scratch()), "the run never started calibrating"
    finally:
        killed.kill()
        killed.wait()
    left = scratch()
    assert left and all(str(killed.pid) in p.name for p in left), left

    # The test can be descheduled between seeing the scratch folder and stopping the run (a loaded 2-core CI
    # machine); a run that published its output before SIGSTOP landed cannot be interrupted, so it is retried.
    for attempt in range(5):
        interrupted = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       preexec_fn=default_sigint)
        try:
            assert _wait_for(lambda: any(str(interrupted.pid) in p.name for p in scratch()))
            interrupted.send_signal(signal.SIGSTOP)
            assert not any(p.exists() for p in left)  # the dead run's folders were removed by this run
            finished = out.exists()
            interrupted.send_signal(signal.SIGINT)  # pending until it resumes: the next bytecode raises it
            interrupted.send_signal(signal.SIGCONT)
            _, err = interrupted.communicate(timeout=120)
        finally:
            if interrupted.poll() is None:
                interrupted.kill()
        if not finished:
            break
        shutil.rmtree(out)
    assert not finished, "every run finished before it could be stopped"
    assert_one_error(interrupted.returncode, err, 130, "interrupted; nothing was written")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- output policy (in-process)

def test_overwrite_replaces_only_effideploy_outputs(tmp_path):
    from effideploy.io import OUTPUT_MARKER, atomic_output_dir, check_output_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(EffideployError, match="not written by effideploy"):
        check_output_dir(foreign, overwrite=True)
    with pytest.raises(EffideployError, match="not written by effideploy"):
        with atomic_output_dir(foreign, overwrite=True):
            pass
    assert (foreign / "thesis.tex").read_text() == "years of work"
    for legacy in (["effideploy.json", "config.json"], ["effideploy_export.json"], ["report.json", "report.md"]):
        old = tmp_path / f"old-{legacy[0]}"
        old.mkdir()
        for name in legacy:
            (old / name).write_text("{}")
        with atomic_output_dir(old, overwrite=True) as staging:
            (staging / "new").write_text("x")
        assert sorted(p.name for p in old.iterdir()) == [OUTPUT_MARKER, "new"]
    with pytest.raises(EffideployError, match="already exists"):
        check_output_dir(old, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", *sorted(f"old-{n}" for n in
                                                                             ("effideploy.json", "effideploy_export.json", "report.json"))]


def test_inputs_never_inside_or_above_or_equal_to_the_output(tmp_path):
    from effideploy.io import check_output_dir

    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    for output in (model, tmp_path / "models", tmp_path, model / "sub"):
        with pytest.raises(EffideployError, match="overlaps the input"):
            check_output_dir(output, overwrite=True, inputs=(model,))
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(EffideployError, match="overlaps the input"):
        check_output_dir(tmp_path / "models", overwrite=True, inputs=(link,))


def test_concurrent_writers_never_lose_a_completed_output(tmp_path):
    from effideploy.io import atomic_output_dir

    target = tmp_path / "out"
    with pytest.raises(EffideployError, match="created by another run"):
        with atomic_output_dir(target, overwrite=False) as first:
            (first / "who").write_text("first")
            with atomic_output_dir(target, overwrite=False) as second:
                (second / "who").write_text("second")
    assert (target / "who").read_text() == "second"
    with atomic_output_dir(target, overwrite=True) as third:  # --overwrite replaces an effideploy output
        (third / "who").write_text("third")
    assert (target / "who").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folders_follow_the_umask_and_parents_are_removed_on_failure(tmp_path):
    from effideploy.io import atomic_output_dir

    previous = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "a" / "b" / "out", overwrite=False) as staging:
            (staging / "x").write_text("x")
        assert (tmp_path / "a" / "b" / "out").stat().st_mode & 0o777 == 0o755
        with pytest.raises(RuntimeError):
            with atomic_output_dir(tmp_path / "c" / "d" / "out", overwrite=False):
                raise RuntimeError("boom")
        assert not (tmp_path / "c").exists()
    finally:
        os.umask(previous)


def test_stale_scratch_of_dead_processes_is_removed_and_unknown_ones_reported(tmp_path, capsys):
    from effideploy.io import check_output_dir

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f".out.partial-{dead.pid}-abcd1234", tmp_path / f".effideploy-gram-{dead.pid}-00ff00ff",
             tmp_path / f".out.old-{dead.pid}-12345678"]
    alive = tmp_path / f".out.partial-{os.getppid()}-abcd1234"
    unknown = tmp_path / ".effideploy-gram-k2j4_x9"
    for folder in (*stale, alive, unknown):
        folder.mkdir()
        (folder / "blob").write_bytes(b"x")
    check_output_dir(tmp_path / "out", overwrite=False)
    assert not any(p.exists() for p in stale)
    assert alive.exists() and unknown.exists()
    err = capsys.readouterr().err
    assert "warning:" in err and unknown.name in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_parent_is_refused_before_work(tmp_path):
    from effideploy.io import check_output_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(EffideployError, match="is not writable"):
            check_output_dir(locked / "sub" / "out", overwrite=False)
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------------------- readers (in-process)

def _tensor_header(**entry):
    base = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    base.update(entry)
    return {"w": {k: v for k, v in base.items() if v is not None}}


HEADER_CASES = {
    "missing dtype": (_tensor_header(dtype=None), 16, "has no dtype"),
    "unknown dtype": (_tensor_header(dtype="F128"), 16, "unsupported dtype F128"),
    "shape vs byte range": (_tensor_header(shape=[4, 4]), 16, r"shape \[4, 4\] x F32 is 64 bytes"),
    "reversed offsets": (_tensor_header(data_offsets=[16, 0]), 16, "reversed data_offsets"),
    "beyond the file": (_tensor_header(data_offsets=[0, 16]), 8, "is truncated"),
    "negative dimension": (_tensor_header(shape=[-2, -2]), 16, "no valid shape"),
    "offsets not integers": (_tensor_header(data_offsets=["0", "16"]), 16, "no valid data_offsets"),
    "entry not an object": ({"w": [1, 2]}, 16, "no header entry object"),
    "header not an object": ([1, 2], 16, "must hold an object"),
    "overlapping tensors": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "overlap"),
}


@pytest.mark.parametrize("name", list(HEADER_CASES))
def test_safetensors_header_is_validated(tmp_path, name):
    from effideploy.models.weights import read_header

    header, data_size, fragment = HEADER_CASES[name]
    path = tmp_path / "model.safetensors"
    write_header(path, header, b"\0" * data_size)
    with pytest.raises(EffideployError, match=fragment):
        read_header(path)


def test_huge_header_length_is_refused_before_reading(tmp_path):
    from effideploy.models.weights import read_header

    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(EffideployError, match="header length"):
        read_header(path)


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/b.safetensors", "..", "", 7, "link.safetensors"])
def test_index_file_names_stay_inside_the_folder(tmp_path, name):
    from effideploy.safe_files import member_path

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"")
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(EffideployError, match="file name"):
        member_path(folder, name, what="weight_map file name")
    assert member_path(folder, "model.safetensors") == folder / "model.safetensors"


def test_readers_name_the_file_for_each_problem(tmp_path):
    from effideploy.safe_files import read_json, read_text

    path = tmp_path / "f.json"
    with pytest.raises(EffideployError, match="not found"):
        read_json(path, what="manifest")
    path.write_bytes(b"\xff{}")
    with pytest.raises(EffideployError, match="f.json is not UTF-8"):
        read_json(path)
    path.write_text("{")
    with pytest.raises(EffideployError, match="not valid JSON"):
        read_json(path)
    path.write_text('"text"')
    with pytest.raises(EffideployError, match="must hold an object, not str"):
        read_json(path)
    path.write_text("[" * 100000)
    with pytest.raises(EffideployError, match="f.json"):
        read_json(path)
    with pytest.raises(EffideployError, match="is a folder"):
        read_text(tmp_path)


def test_manifest_and_provenance_readers_refuse_malformed_files(tmp_path):
    from effideploy.checkpoint.writer import read_provenance
    from effideploy.exporters.manifest import read_export_manifest

    (tmp_path / "effideploy_export.json").write_text("[]")
    (tmp_path / "effideploy.json").write_bytes(b"\x80")
    with pytest.raises(EffideployError, match="effideploy_export.json must hold an object"):
        read_export_manifest(tmp_path)
    with pytest.raises(EffideployError, match="effideploy.json is not UTF-8"):
        read_provenance(tmp_path)


def test_fuzzed_headers_configs_and_manifests_only_raise_effideploy_errors(tmp_path, tiny_model_dir):
    """Seeded random and truncated bytes as safetensors files, config.json, indexes and manifests."""
    from effideploy.models.resolve import read_config_dict
    from effideploy.models.weights import index_files, read_header
    from effideploy.safe_files import read_json

    rng = random.Random(1234)
    real_st = (tiny_model_dir / "model.safetensors").read_bytes()
    real_config = (tiny_model_dir / "config.json").read_bytes()
    real_index = json.dumps({"metadata": {}, "weight_map": {"a": "model.safetensors"}}).encode()
    real_manifest = json.dumps({"format": 1, "runtime": "vllm", "source": {"path": "/x"}}).encode()
    header_len = struct.unpack("<Q", real_st[:8])[0]

    def mutate(blob: bytes, limit: int) -> bytes:
        kind = rng.randrange(5)
        if kind == 0:
            return rng.randbytes(rng.randrange(0, 64))
        if kind == 1:
            return blob[: rng.randrange(0, min(len(blob), limit))]
        data = bytearray(blob[:limit])
        for _ in range(rng.randrange(1, 8)):
            if not data:
                break
            position = rng.randrange(len(data))
            if kind == 2:
                data[position] = rng.randrange(256)
            elif kind == 3:
                del data[position: position + rng.randrange(1, 8)]
            else:
                data[position:position] = rng.choice([b"{", b"}", b"[", b'"', b"-1", b"1e999", b"null", b"\xff", b","])
        return bytes(data)

    folder = tmp_path / "m"
    folder.mkdir()
    st_path = folder / "model.safetensors"
    # the readers accept the unmutated inputs, so each refusal below is the mutation's
    st_path.write_bytes(real_st)
    (folder / "config.json").write_bytes(real_config)
    (folder / "model.safetensors.index.json").write_bytes(real_index)
    (folder / "effideploy_export.json").write_bytes(real_manifest)
    assert read_header(st_path) and read_config_dict(folder) and index_files(folder)
    assert read_json(folder / "effideploy_export.json")["runtime"] == "vllm"
    refused = {"header": 0, "config": 0, "index": 0, "manifest": 0}
    for _ in range(300):
        # a safetensors file: the header region mutated, data left as is
        head = mutate(real_st[: 8 + header_len], 8 + header_len)
        st_path.write_bytes(head + real_st[8 + header_len:][: rng.randrange(0, 5000)])
        try:
            entries = read_header(st_path)
        except EffideployError:
            refused["header"] += 1
        else:  # what the reader accepts, it can serve: every byte range inside the file
            assert all(offset + nbytes <= st_path.stat().st_size for _, offset, _, _, nbytes in entries.values())
        (folder / "config.json").write_bytes(mutate(real_config, len(real_config)))
        (folder / "model.safetensors.index.json").write_bytes(mutate(real_index, len(real_index)))
        (folder / "effideploy_export.json").write_bytes(mutate(real_manifest, len(real_manifest)))
        for kind, call in (("config", lambda: read_config_dict(folder)), ("index", lambda: index_files(folder)),
                           ("manifest", lambda: read_json(folder / "effideploy_export.json"))):
            try:
                call()
            except EffideployError:
                refused[kind] += 1
    # Any other exception has already failed the test; the fuzz must also have reached the refusals of every
    # reader (a mutation that never breaks anything tests nothing).
    assert all(count > 0 for count in refused.values()), refused


def test_validated_config_builds(tmp_path, tiny_model_dir):
    """Whatever read_config_dict accepts, build_config accepts: a wrong field is refused by the reader, in one line,
    never later by transformers (random values in one to three fields at a time, 200 times)."""
    from effideploy.models.build import build_config
    from effideploy.models.resolve import SUPPORTED_MODEL_TYPES, read_config_dict

    rng = random.Random(7)
    base = json.loads((tiny_model_dir / "config.json").read_text())
    values = [None, "12", 12.5, -1, 0, True, False, [], {}, 2, 64, 1e9, 10**12, "llama", {"rope_type": "linear"}]
    accepted = 0
    for _ in range(200):
        config = dict(base)
        for key in rng.sample(sorted(base), rng.randint(1, 3)):
            config[key] = rng.choice(values)
        (tmp_path / "config.json").write_text(json.dumps(config))
        try:
            checked = read_config_dict(tmp_path)
        except EffideployError:
            continue
        if checked.get("model_type") not in SUPPORTED_MODEL_TYPES:  # the reader leaves naming it to the resolver
            with pytest.raises(EffideployError, match="unsupported architecture"):
                build_config(checked)
            continue
        build_config(checked)  # any error here, one-line or not, is a config read_config_dict should have refused
        accepted += 1
    assert 10 <= accepted < 200, accepted  # both branches were exercised (24 accepted with this seed)


# ------------------------------------------------------------------------------------------- remote code

def test_every_auto_class_load_refuses_remote_code():
    """Static rule: every AutoX.from_pretrained in the product passes trust_remote_code=False."""
    offenders = []
    for folder in ("effideploy", "exporters", "runtimes", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"Auto\w+\.from_pretrained\(", text):
                depth, end = 0, match.end() - 1
                for end in range(match.end() - 1, len(text)):
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                if "trust_remote_code=False" not in text[match.start():end]:
                    offenders.append(f"{path.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}")
    assert offenders == []


def test_tokenizer_auto_map_is_never_executed(tmp_path, tiny_model_dir, pruned_dir):
    from effideploy.models.build import load_tokenizer
    from effideploy.models.resolve import resolve_model
    from effideploy.recovery.train import training_windows  # noqa: F401 - recovery loads through load_tokenizer

    sentinel = tmp_path / "PWNED"
    text = "The history of the city begins"
    for source in (tiny_model_dir, pruned_dir):
        folder = copy_model(source, tmp_path / source.name)
        (folder / "evil_tok.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
        # the sentinel is live: importing the module the auto_map names does create it
        subprocess.run([sys.executable, "-c", "import evil_tok"], cwd=folder, check=True)
        assert sentinel.exists()
        sentinel.unlink()
        edit_json(folder / "tokenizer_config.json",
                  lambda d: d.update(auto_map={"AutoTokenizer": ["evil_tok.Tok", "evil_tok.Tok"]}))
        tokenizer = load_tokenizer(resolve_model(folder))  # loads (no error swallowed), with transformers' own class
        assert type(tokenizer).__module__.startswith("transformers."), type(tokenizer)
        assert tokenizer(text).input_ids == load_tokenizer(source)(text).input_ids
        assert not sentinel.exists()


def test_own_auto_map_is_the_checkpoint_one():
    from effideploy.checkpoint.config import AUTO_MAP
    from effideploy.safe_files import OWN_AUTO_MAP, strip_foreign_auto_map

    assert OWN_AUTO_MAP == AUTO_MAP
    mixed = {"auto_map": {**AUTO_MAP, "AutoTokenizer": "x.Y", "AutoModel": "hub/repo--m.M"}, "a": 1}
    assert strip_foreign_auto_map(mixed) == {"auto_map": AUTO_MAP, "a": 1}
    assert strip_foreign_auto_map({"auto_map": {"AutoConfig": "evil.C"}}) == {}
    assert strip_foreign_auto_map({"auto_map": "junk"}) == {}


# ---------------------------------------------------------------------------------------- error boundary

def test_a_bug_is_one_line_with_exit_1_and_a_traceback_when_debugging(monkeypatch, capsys):
    from effideploy import cli
    from effideploy.pruning import config as prune_config

    def bug(self):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(prune_config.PruneConfig, "__post_init__", bug)
    monkeypatch.delenv("EFFIDEPLOY_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", "--output", "/nonexistent/never"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert error_lines(err) == [error_lines(err)[0]] and "internal error (ZeroDivisionError: oops)" in err
    assert "EFFIDEPLOY_DEBUG=1" in err
    monkeypatch.setenv("EFFIDEPLOY_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["prune", "--output", "/nonexistent/never"])


def test_os_errors_are_one_line_with_exit_2(monkeypatch, capsys):
    from effideploy import cli
    from effideploy.pruning import config as prune_config

    def denied(self):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(prune_config.PruneConfig, "__post_init__", denied)
    monkeypatch.delenv("EFFIDEPLOY_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", "--output", "/nonexistent/never"])
    assert exit_info.value.code == 2
    assert error_lines(capsys.readouterr().err) == ["error: Permission denied: /some/file"]


def test_only_effideploys_own_remote_code_is_ever_trusted(tmp_path, pruned_dir):
    """vLLM loads pruned exports with trust_remote_code=True: only after this check passes."""
    from effideploy.safe_files import check_own_remote_code

    check_own_remote_code(pruned_dir)  # effideploy's own checkpoint
    tampered = copy_model(pruned_dir, tmp_path / "tampered")
    with (tampered / "configuration_decilm.py").open("a") as handle:
        handle.write("\nimport os; os.system('touch PWNED')\n")
    with pytest.raises(EffideployError, match="differs from the code effideploy ships"):
        check_own_remote_code(tampered)
    foreign = copy_model(pruned_dir, tmp_path / "foreign")
    edit_json(foreign / "config.json", lambda d: d["auto_map"].update(AutoModel="evil.Model"))
    with pytest.raises(EffideployError, match="remote code effideploy does not ship"):
        check_own_remote_code(foreign)
