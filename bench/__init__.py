"""``effideploy bench``: the dense baseline and its candidates measured on one runtime in one run (speed, memory,
size, accuracy), EffiVLM-Bench's OP/OG/OL/OE, a Pareto front, a policy gate and a report folder.

By role:

- :mod:`effideploy.bench.config`: ``BenchConfig`` and ``CandidateSpec`` (the defaults the CLI shows).
- :mod:`effideploy.bench.artifacts`: what each model opens; the one export-or-reuse (content fingerprint + options).
- :mod:`effideploy.bench.measure`: latency, throughput, the memory probe (:mod:`effideploy.bench.memory`).
- :mod:`effideploy.bench.quality`: perplexity and multiple choice through the runtime's scoring.
- :mod:`effideploy.bench.compare`: ``Comparison`` (typed, per candidate) and the Pareto fronts.
- :mod:`effideploy.bench.results`: ``ModelResult`` and ``BenchReport``.
- :mod:`effideploy.bench.runner`: ``run_bench(config) -> BenchReport``, the phases in order.
- :mod:`effideploy.bench.report` / :mod:`effideploy.bench.plots`: report.md, report.json, PNG plots.
- :mod:`effideploy.bench.metrics`: the arithmetic (pure functions); :mod:`effideploy.bench.policy`: the gate.
- :mod:`effideploy.bench.pipeline`: ``run_pipeline`` behind ``effideploy run``.
"""
