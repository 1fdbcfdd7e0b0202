"""Cost measurements: parameters, GFLOPs, throughput, latency and peak memory.

Throughput is measured the same way everywhere (``eval``, ``bench``, ``compress``, benchmarks):
warm-up runs, then the median of repeated timed runs, under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitshrink.errors import VitshrinkError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunSettings:
    """How a model is run when it is measured."""

    device: str = "cpu"
    amp: str | None = None
    """None, 'bf16' or 'fp16' (autocast)."""
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.amp not in (None, "none", "bf16", "fp16"):
            raise VitshrinkError(f"--amp must be bf16 or fp16, got '{self.amp}'.")
        if self.amp == "none":
            self.amp = None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise VitshrinkError(f"--device {self.device}: CUDA is not available on this machine; use --device cpu.")
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise VitshrinkError("--device mps: MPS is not available on this machine; use --device cpu.")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=AMP_DTYPES[self.amp])

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device in eval mode, channels-last / compiled as asked."""
        model = model.eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model = torch.compile(model)
        return model

    def inputs(self, batch_size: int, input_size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, *input_size, generator=gen).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# timm's ViT uses scaled_dot_product_attention; on CPU it dispatches to an op FlopCounterMode
# does not count, so its cost is added with torch's own SDPA formula.
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:  # noqa: ANN001
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop


def count_gflops(model: nn.Module, input_size: tuple[int, ...], device: str = "cpu") -> float:
    """GFLOPs of one image, counting a multiply-add as one FLOP (the convention papers use)."""
    x = torch.randn(1, *input_size, device=device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_batches(
    model: nn.Module, x: torch.Tensor, settings: RunSettings, *, runs: int, iters_per_run: int = 1
) -> list[float]:
    """Seconds per forward pass for each of ``runs`` timed runs."""
    times = []
    with torch.inference_mode(), settings.autocast():
        for _ in range(runs):
            _sync(settings.device)
            start = time.perf_counter()
            for _ in range(iters_per_run):
                model(x)
            _sync(settings.device)
            times.append((time.perf_counter() - start) / iters_per_run)
    return times


@dataclass
class Throughput:
    batch_size: int
    images_per_second: float
    """Median over timed runs."""
    run_images_per_second: list[float]
    latency_ms_batch1: float | None = None
    """Median batch-1 latency."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_throughput(
    model: nn.Module,
    input_size: tuple[int, ...],
    settings: RunSettings,
    *,
    batch_size: int = 32,
    warmup: int = 3,
    runs: int = 10,
    latency: bool = True,
) -> Throughput:
    """Warm up, then the median images/s over ``runs`` timed batches; batch-1 latency too."""
    model = settings.prepare(model)
    x = settings.inputs(batch_size, input_size)
    time_batches(model, x, settings, runs=warmup)
    times = time_batches(model, x, settings, runs=runs)
    rates = [batch_size / t for t in times]
    result = Throughput(batch_size, statistics.median(rates), rates)
    if latency:
        x1 = settings.inputs(1, input_size)
        time_batches(model, x1, settings, runs=warmup)
        result.latency_ms_batch1 = statistics.median(time_batches(model, x1, settings, runs=runs)) * 1e3
    return result


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes held by tensors created inside it, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self.live.get(ptr)
            if entry is None:
                self.live[ptr] = entry = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, ptr)
        return out


def peak_memory_mb(model: nn.Module, input_size: tuple[int, ...], settings: RunSettings, batch_size: int) -> dict[str, float]:
    """Peak memory of one forward pass at ``batch_size``: weights plus the peak of live activations.

    On CUDA this is the allocator's peak; on CPU the bytes of tensors alive at once, tracked op by op.
    """
    model = settings.prepare(model)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    x = settings.inputs(batch_size, input_size)
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode(), settings.autocast():
            model(x)
        torch.cuda.synchronize()
        activations = torch.cuda.max_memory_allocated() - base
        method = "cuda allocator peak"
    else:
        tracker = _LiveTensorBytes()
        with torch.inference_mode(), settings.autocast(), tracker:
            model(x)
        activations = tracker.peak
        method = "live tensor bytes"
    return {
        "weights_mb": weights / 2**20,
        "activations_mb": activations / 2**20,
        "peak_mb": (weights + activations) / 2**20,
        "batch_size": batch_size,
        "method": method,
    }


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def input_size_of(model: nn.Module) -> tuple[int, int, int]:
    from vitshrink.data import data_config

    return tuple(data_config(model)["input_size"])  # type: ignore[return-value]


def measure_model(
    model: nn.Module,
    settings: RunSettings,
    *,
    batch_size: int = 32,
    runs: int = 10,
    warmup: int = 3,
    speed: bool = True,
) -> dict[str, Any]:
    """Parameters, GFLOPs, throughput/latency and peak memory of ``model`` in one dict."""
    input_size = input_size_of(model)
    out: dict[str, Any] = {
        "cost": {
            "params_m": count_params(model) / 1e6,
            "gflops": count_gflops(model, input_size),
            "input_size": list(input_size),
        }
    }
    if speed:
        out["throughput"] = measure_throughput(
            model, input_size, settings, batch_size=batch_size, runs=runs, warmup=warmup
        ).to_dict()
        out["memory"] = peak_memory_mb(model, input_size, settings, batch_size)
    return out
