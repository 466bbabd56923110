"""Peak memory of one model on one runtime, measured in a fresh process so that models do not share a high-water mark.

The parent starts ``python -m effideploy.bench.memory ARGS.json``; the child imports the runtime, opens the model,
generates once and prints a JSON line. Two measurements are combined:

- the child's own RSS high-water mark (VmHWM in /proc/self/status: exact, but blind to helper processes; not
  ``ru_maxrss``, which Linux carries over from the forking parent across exec);
- the RSS of the child's process tree sampled by the parent every 20 ms with psutil (catches engine workers that a
  runtime may spawn, but can miss a spike shorter than the interval); a helper process counts once it has been seen
  in 3 consecutive samples, since a fork that immediately execs a tool reports its parent's pages as its own.

``peak_rss_mb`` is the larger of the two; ``baseline_rss_mb`` is the child's RSS after importing the runtime and
before opening the model, so ``peak - baseline`` is what the model itself costs (weights, KV cache, activations).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from effideploy.errors import EffideployError

SAMPLE_SECONDS = 0.02
MIN_SAMPLES = 3
MB = 1024 * 1024  # the *_mb fields are MiB (2**20 bytes); reports label them MiB


def measure_peak_memory(runtime: str, path: str, prompt: list[int], new_tokens: int, *, compression: str | None = None,
                        threads: int | None = None, options: dict | None = None, timeout: float = 1800) -> dict:
    import psutil

    with tempfile.TemporaryDirectory(prefix="effideploy-memory-") as folder:
        args = Path(folder) / "args.json"
        args.write_text(json.dumps({"runtime": runtime, "path": str(path), "prompt": prompt, "new_tokens": new_tokens,
                                    "compression": compression, "threads": threads, "options": options or {}}))
        env = {**os.environ, "EFFIDEPLOY_PROGRESS": "0"}
        child = subprocess.Popen([sys.executable, "-m", "effideploy.bench.memory", str(args)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        peak_tree, started, seen = 0, time.monotonic(), {}
        try:
            process = psutil.Process(child.pid)
            while child.poll() is None:
                try:
                    helpers = process.children(recursive=True)
                except psutil.NoSuchProcess:
                    helpers = []
                # A fork that execs a tool at once (ldconfig) reports its parent's pages as its own RSS: count only
                # helpers seen in MIN_SAMPLES consecutive samples (engine workers live for the whole run).
                seen = {h.pid: seen.get(h.pid, 0) + 1 for h in helpers}
                peak_tree = max(peak_tree, _rss(process) + sum(_rss(h) for h in helpers if seen[h.pid] >= MIN_SAMPLES))
                if time.monotonic() - started > timeout:
                    child.kill()
                    raise EffideployError(f"memory measurement of {path} on {runtime} ran past {timeout:.0f} s")
                time.sleep(SAMPLE_SECONDS)
        finally:
            stdout, stderr = child.communicate()
    if child.returncode != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        raise EffideployError(f"memory measurement of {path} on {runtime} failed: {lines[-1] if lines else child.returncode}")
    record = json.loads(stdout.strip().splitlines()[-1])
    record["tree_peak_rss_mb"] = peak_tree / MB
    record["peak_rss_mb"] = max(record["self_peak_rss_mb"], record["tree_peak_rss_mb"])
    record["model_rss_mb"] = record["peak_rss_mb"] - record["baseline_rss_mb"]
    record["method"] = "fresh process per model: max(VmHWM of the process, psutil RSS of its tree every 20 ms)"
    return record


def _rss(process) -> int:
    try:
        return process.memory_info().rss
    except Exception:  # noqa: BLE001 - a helper process that just exited
        return 0


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark. Linux: VmHWM of the address space, which starts afresh at exec;
    ru_maxrss would carry over the RSS of the parent that forked us (Linux keeps it across execve)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes
    return value / MB if sys.platform == "darwin" else value / 1024


def _child(args_path: str) -> None:
    import psutil

    args = json.loads(Path(args_path).read_text())
    import torch

    from effideploy.runtimes import RUNTIMES, open_runtime

    # Everything imported before the baseline, so that the model RSS is the model's: the runtime's libraries, the
    # modeling code its loader imports, and the compression code.
    RUNTIMES.get(args["runtime"]).preload()
    if args["compression"]:
        import effideploy.compression.hooks  # noqa: F401
        import effideploy.compression.onnx  # noqa: F401
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    baseline = psutil.Process().memory_info().rss / MB
    options = dict(args["options"])
    if args["threads"]:
        options["threads"] = args["threads"]
    runtime = open_runtime(args["runtime"], args["path"], **options)
    loaded = psutil.Process().memory_info().rss / MB
    if args["compression"]:
        runtime.compress(args["compression"])
    runtime.generate([args["prompt"]], args["new_tokens"])
    gpu = torch.cuda.max_memory_allocated() / MB if torch.cuda.is_available() else None
    self_peak = _peak_rss_mb()
    runtime.close()
    print(json.dumps({"baseline_rss_mb": baseline, "loaded_rss_mb": loaded, "self_peak_rss_mb": self_peak,
                      "gpu_peak_allocated_mb": gpu}))


if __name__ == "__main__":
    _child(sys.argv[1])
