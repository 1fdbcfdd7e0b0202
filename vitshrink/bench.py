"""Side-by-side throughput of several models in one run, interleaved so machine drift cancels.

Each round times one batch of every model in turn (A B C A B C ...); a model's figure is the
median over rounds, and its ratio is against the first model measured in the same run.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from torch import nn

from vitshrink.measure import RunSettings, count_gflops, count_params, time_batches
from vitshrink.progress import progress_bar


@dataclass
class BenchRow:
    name: str
    images_per_second: float
    ratio: float
    """Throughput relative to the first model in the same run."""
    run_images_per_second: list[float]
    params_m: float
    gflops: float | None
    input_size: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def bench(
    models: list[tuple[str, nn.Module, tuple[int, ...]]],
    settings: RunSettings,
    *,
    batch_size: int = 32,
    rounds: int = 10,
    warmup: int = 2,
    flops: bool = True,
    progress: bool = True,
) -> list[BenchRow]:
    """``models`` is a list of (name, model, input_size). Returns one row per model, in order."""
    prepared = []
    for name, model, input_size in models:
        gflops = count_gflops(model, input_size) if flops else None
        params = count_params(model) / 1e6
        run_model = settings.prepare(model)
        x = settings.inputs(batch_size, input_size)
        time_batches(run_model, x, settings, runs=warmup)
        prepared.append((name, run_model, x, input_size, params, gflops))
    rates: list[list[float]] = [[] for _ in prepared]
    with progress_bar("Benchmarking", total=rounds, enabled=progress) as advance:
        for _ in range(rounds):
            for i, (_, run_model, x, *_rest) in enumerate(prepared):
                (seconds,) = time_batches(run_model, x, settings, runs=1)
                rates[i].append(batch_size / seconds)
            advance()
    medians = [statistics.median(r) for r in rates]
    return [
        BenchRow(name, med, med / medians[0], r, params, gflops, tuple(input_size))
        for (name, _, _, input_size, params, gflops), med, r in zip(prepared, medians, rates, strict=True)
    ]
