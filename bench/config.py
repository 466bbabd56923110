"""What a bench run measures: frozen dataclasses, the single source of the defaults the API and the CLI share."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from effideploy.errors import EffideployError, OptionError

DENSE_LABEL = "dense"
EXPORT_ROOT = "out/exports"


@dataclass(frozen=True)
class CandidateSpec:
    """A model to compare with the dense one: a checkpoint or export (``model``), or the dense model itself with
    token compression (``model=None``, ``compression="snapkv:0.2"``)."""

    model: str | None = None
    compression: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class BenchConfig:
    """``mc_limit``: examples per multiple-choice task (a seeded subset); 0 skips multiple choice, None takes all.
    ``tasks``: BIG-bench task.json files or folders; empty: every task in the data folders."""

    runtime: str = "torch"
    dense: str = "llama"
    candidates: tuple[CandidateSpec, ...] = ()
    prompt_tokens: int = 256
    new_tokens: int = 32
    prompts: int = 2
    warmup: int = 1
    repeats: int = 5
    batch_sizes: tuple[int, ...] = (1, 4)
    throughput_repeats: int = 2
    ppl_windows: int = 8
    ppl_seqlen: int = 1024
    tasks: tuple[str, ...] = ()
    mc_limit: int | None = 50
    seed: int = 0
    memory: bool = True
    threads: int | None = None
    data_dir: str | None = None
    export_root: str = EXPORT_ROOT

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "prompts", "repeats", "ppl_seqlen"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise OptionError("new_tokens", f"must be at least 2 (one decode step), got {self.new_tokens}")
        if self.ppl_seqlen < 4:
            raise OptionError("ppl_seqlen", f"must be at least 4 (a compressed window scores its second half), got {self.ppl_seqlen}")
        for name in ("warmup", "throughput_repeats", "ppl_windows"):
            if getattr(self, name) < 0:
                raise OptionError(name, f"must not be negative, got {getattr(self, name)}")
        if any(b < 1 for b in self.batch_sizes):
            raise OptionError("batch_sizes", f"must be positive, got {list(self.batch_sizes)}")
        if self.mc_limit is not None and self.mc_limit < 0:
            raise OptionError("mc_limit", f"must not be negative, got {self.mc_limit}")
        if self.threads is not None and self.threads < 1:
            raise OptionError("threads", f"must be at least 1, got {self.threads}")
        if not self.candidates:
            raise EffideployError("no candidates to compare with the dense model; give --candidate or --token-compression")

    def to_dict(self) -> dict:
        return asdict(self)
