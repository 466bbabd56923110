"""What a bench run measures: frozen dataclasses, the single source of the defaults the API and the CLI share."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from effideploy.errors import EffideployError, OptionError

DENSE_LABEL = "dense"
EXPORT_ROOT = "out/exports"

# ``effideploy run``'s departures from the defaults below (bench's 50 examples per task would double a run on 2
# cores), and its ``--quick`` smoke settings.
RUN_BENCH = {"mc_limit": 30}
QUICK_PRUNE = {"calib_samples": 16, "calib_seqlen": 512}
QUICK_BENCH = {"ppl_windows": 4, "mc_limit": 20, "repeats": 3, "new_tokens": 16, "batch_sizes": (1, 2),
               "throughput_repeats": 1}


@dataclass(frozen=True)
class CandidateSpec:
    """A model to compare with the dense one: a checkpoint or export (``model``; None: the dense model itself),
    optionally with token compression (``compression="snapkv:0.2"``) or exported with quantized weights
    (``quantize="int8"``, a scheme of the runtime's exporter). ``export_options``: further exporter options the
    scheme implies, as (name, value) pairs (e.g. ``(("group_size", 64),)`` for vLLM's w4a16)."""

    model: str | None = None
    compression: str | None = None
    label: str | None = None
    quantize: str | None = None
    export_options: tuple = ()


@dataclass(frozen=True)
class BenchConfig:
    """``mc_limit``: examples per multiple-choice task (a seeded subset); 0 skips multiple choice, None takes all.
    ``tasks``: BIG-bench task.json files or folders; empty: every task in the data folders. ``chat_prompts``: the
    first N prompts of the packaged chat set, answered greedily through the chat template (``chat_new_tokens``
    at most) by every model and compared with dense's answers (effideploy.eval.chat); 0 skips it."""

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
    chat_prompts: int = 0  # chat prompts of the packaged set for generation fidelity (effideploy.eval.chat); 0: off
    chat_new_tokens: int = 48  # greedy tokens per chat response (a response ends earlier at a stop token)
    quantize: tuple[str, ...] = ()  # also bench the dense model and every checkpoint exported with these schemes
    memory: bool = True
    threads: int | None = None
    device: str | None = None  # auto | cpu | cuda[:N] for every model opened (None: the runtime's default)
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
        if self.chat_prompts < 0:
            raise OptionError("chat_prompts", f"must not be negative (0 skips the chat measure), got {self.chat_prompts}")
        if self.chat_prompts:
            from effideploy.eval.chat import load_chat_prompts

            available = len(load_chat_prompts())
            if self.chat_prompts > available:
                raise OptionError("chat_prompts", f"must be at most {available} (the packaged chat prompt set), "
                                                  f"got {self.chat_prompts}")
        if self.chat_new_tokens < 1:
            raise OptionError("chat_new_tokens", f"must be at least 1, got {self.chat_new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise OptionError("threads", f"must be at least 1, got {self.threads}")
        if self.device is not None:
            from effideploy.device import check_spec

            check_spec(self.device)
        if not self.candidates and not self.quantize:
            raise EffideployError("no candidates to compare with the dense model; give --candidate, --token-compression "
                                  "or --quantize")

    def to_dict(self) -> dict:
        return asdict(self)


def expanded_candidates(config: BenchConfig) -> tuple[CandidateSpec, ...]:
    """The candidates as given, then for each quantization scheme the dense model and every checkpoint candidate
    (not a compression candidate) exported with it: one run gives the pruning x quantization table."""
    extra = []
    for scheme in config.quantize:
        extra.append(CandidateSpec(quantize=scheme))
        extra += [CandidateSpec(model=spec.model, quantize=scheme) for spec in config.candidates
                  if spec.model is not None and spec.compression is None and spec.quantize is None]
    return tuple(config.candidates) + tuple(extra)
