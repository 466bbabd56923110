"""Speed and memory: interleaved latency repeats, the throughput sweep and the peak-memory probe.

Every model is opened once and warmed up; then the timed repeats run round-robin over the models, the order rotated
each round, so that whatever the machine does meanwhile (other jobs, thermal state) falls on all models alike.
Latency is greedy generation one prompt at a time (TTFT, TPOT, end-to-end per request); throughput is
``generate_batch`` at each batch size (generated tokens / wall time of the batch).
"""

from __future__ import annotations

from effideploy import progress
from effideploy.bench.config import BenchConfig
from effideploy.bench.results import ModelResult


class RuntimePool:
    """One open runtime per distinct artifact (a compression candidate shares the dense model's), with each model's
    token compression attached before its runtime is handed out."""

    def __init__(self, runtime_name: str, options: dict) -> None:
        self.runtime_name, self.options = runtime_name, options
        self.by_artifact: dict[str, object] = {}
        self.models: dict[str, ModelResult] = {}
        self.users: dict[str, int] = {}  # models per artifact

    def open(self, model: ModelResult) -> None:
        from effideploy.runtimes import open_runtime

        key = str(model.artifact)
        if key not in self.by_artifact:
            with progress.status(f"Opening {model.label} on {self.runtime_name}"):
                self.by_artifact[key] = open_runtime(self.runtime_name, key, **self.options)
        self.models[model.label] = model
        self.users[key] = self.users.get(key, 0) + 1
        if model.compression:
            self.by_artifact[key].compress(model.compression)  # refuses what the runtime cannot run, before measuring

    def __getitem__(self, label: str):
        model = self.models[label]
        runtime = self.by_artifact[str(model.artifact)]
        if self.users[str(model.artifact)] > 1:  # one runtime serves models of different compression: attach this one's
            runtime.compress(model.compression)
        return runtime

    def close(self) -> None:
        for runtime in self.by_artifact.values():
            runtime.close()
        self.by_artifact.clear()


def rotations(items: list, rounds: int):
    """The items once per round, the order rotated by one each round."""
    for round_ in range(rounds):
        shift = round_ % len(items)
        yield from items[shift:] + items[:shift]


def measure_latency(models: list[ModelResult], runtimes: RuntimePool, prompts: list[list[int]],
                    config: BenchConfig) -> None:
    for _ in range(config.warmup):
        for model in models:
            runtimes[model.label].generate(prompts[:1], min(4, config.new_tokens))
    with progress.Bar("Latency (interleaved repeats)", config.repeats * len(models)) as bar:
        for model in rotations(models, config.repeats):
            runtime = runtimes[model.label]
            generation = runtime.generate(prompts, config.new_tokens)
            latency = model.latency
            latency.ttft_s += list(generation.prefill_seconds)
            latency.tpot_s += [s for steps in generation.decode_seconds for s in steps]
            latency.e2e_s += [p + sum(d) for p, d in zip(generation.prefill_seconds, generation.decode_seconds)]
            latency.tokens = generation.tokens
            model.kv_cache = runtime.kv_record() if model.compression else None
            bar.advance()


def measure_throughput(models: list[ModelResult], runtimes: RuntimePool, prompts: list[list[int]],
                       config: BenchConfig) -> list[str]:
    """Tokens/s per batch size; returns notes for the models whose runtime cannot batch as configured."""
    runnable = [m for m in models if runtimes[m.label].can_batch]
    notes = [f"throughput not measured for {m.label}: the {runtimes[m.label].name} runtime cannot batch it "
             f"({'with token compression attached' if m.compression else 'no batched generation'})"
             for m in models if m not in runnable]
    if config.throughput_repeats == 0 or not runnable:
        return notes
    total = len(config.batch_sizes) * config.throughput_repeats * len(runnable)
    with progress.Bar("Throughput (batch sweep)", total) as bar:
        for batch_size in config.batch_sizes:
            batch = [prompts[i % len(prompts)] for i in range(batch_size)]
            for model in runnable:  # one untimed batch: allocator and cache shapes for this size
                runtimes[model.label].generate_batch(batch, min(4, config.new_tokens))
            for model in rotations(runnable, config.throughput_repeats):
                generation = runtimes[model.label].generate_batch(batch, config.new_tokens)
                tokens = sum(len(t) for t in generation.tokens)
                model.throughput.setdefault(str(batch_size), []).append(tokens / generation.total_seconds)
                bar.advance()
    return notes


def measure_memory(models: list[ModelResult], prompt: list[int], config: BenchConfig, options: dict) -> None:
    from effideploy.bench.memory import measure_peak_memory

    for model in progress.track(models, "Peak memory (one process per model)"):
        model.memory = measure_peak_memory(config.runtime, str(model.artifact), prompt, config.new_tokens,
                                           compression=model.compression, threads=config.threads, options=options)
