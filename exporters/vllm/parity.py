"""Child process of the vLLM export's parity check: load a folder in stock vLLM and write greedy tokens as JSON.

``python -m effideploy.exporters.vllm.parity REQUEST.json``; the request names the folder, prompts (token ids),
dtype, the KV-cache dtypes to try and the result file; with ``sequences`` instead of ``prompts`` each sequence is
scored teacher-forced (``VllmRuntime.score_windows``: next-token log-probability and argmax at every position). Running apart keeps vLLM's start-up (thread binding, memory
policy, a frozen GC heap) out of the exporting process. Errors are written to the result file as one line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    result = Path(request["result"])
    runs = {}
    try:
        from effideploy.runtimes.vllm import VllmRuntime

        for kv_cache_dtype in request["kv_cache_dtypes"]:
            tick = time.perf_counter()
            with VllmRuntime(request["path"], max_model_len=request["max_model_len"], dtype=request["dtype"],
                             kv_cache_dtype=kv_cache_dtype) as runtime:
                started = time.perf_counter() - tick
                if "sequences" in request:
                    scores = runtime.score_windows(request["sequences"])
                    runs[kv_cache_dtype] = {"logprobs": [(-s.nll).tolist() for s in scores],
                                            "argmax": [s.argmax.tolist() for s in scores], "start_seconds": started}
                    continue
                tokens = runtime.generate(request["prompts"], request["max_new_tokens"]).tokens
            runs[kv_cache_dtype] = {"tokens": tokens, "start_seconds": started}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        result.write_text(json.dumps({"error": lines[-1].strip()}))
        return 3
    result.write_text(json.dumps({"runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
