"""Export a model (any model source, typically a vitshrink output folder) for deployment.

Formats: ONNX (``torch.onnx.export``, checked with onnxruntime), TorchScript (``torch.jit.trace``) and
a ``torch.export`` ExportedProgram (``.pt2``). The batch dimension is exported as dynamic when the
model allows it. Every export is checked against the PyTorch model on random inputs before it is moved
into place, so a file at the output path always matches (max abs difference in the result).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from vitshrink.errors import VitshrinkError

Format = Literal["onnx", "torchscript", "exported-program"]
FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
"""Format -> file suffix of the default output."""
ONNX_EXTRA = "pip install 'vitshrink[onnx]'"
EXTERNAL_DATA_BYTES = 1536 * 1024**2
"""Above this many parameter bytes the ONNX weights go to a ``<name>.onnx.data`` file (2 GB protobuf limit)."""


@dataclass
class ExportResult:
    """Where the export went and how closely it matches PyTorch."""

    path: Path
    format: str
    max_abs_diff: float | None
    """Largest |exported - PyTorch| over the checked logits (None when not checked)."""
    input_size: tuple[int, int, int]
    dynamic_batch: bool
    """True when the exported graph was checked at two batch sizes."""
    checked_with: str | None = None
    """The runtime that ran the exported graph for the check."""
    extra_files: tuple[Path, ...] = ()
    """Files written beside ``path`` (ONNX external weights)."""


def default_output(source: str, fmt: str) -> Path:
    """``<folder>.onnx`` beside an output folder; ``./<name>.onnx`` for other sources."""
    suffix = FORMATS[fmt]
    text = str(source)
    if text.startswith("local-dir:"):
        text = text[len("local-dir:") :]
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve().parent / f"{path.resolve().name}{suffix}"
    name = text.split(":", 1)[-1].rstrip("/").replace("/", "--")
    if path.suffix:
        name = path.stem
    return Path.cwd() / f"{name or 'model'}{suffix}"


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise VitshrinkError(f"Unknown export format '{fmt}': use one of {', '.join(FORMATS)}.")
    return fmt


def _check_output(output: Path, *, overwrite: bool) -> None:
    if output.exists() and output.is_dir():
        raise VitshrinkError(f"Export output '{output}' is a folder: give a file path, e.g. {output / 'model.onnx'}.")
    if output.exists() and not overwrite:
        raise VitshrinkError(f"'{output}' already exists: choose another --output or pass --overwrite.")
    if not output.parent.exists():
        raise VitshrinkError(f"Folder '{output.parent}' for the export does not exist: create it first.")


def _onnx_modules() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise VitshrinkError(
            f"ONNX export needs {', '.join(missing)}, which is not installed: {ONNX_EXTRA}."
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter warnings (TorchScript deprecation, tracer notes) and progress prints."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------- writers
def _batch_dim(batch_size: int) -> dict[int, object]:
    return {0: torch.export.Dim("batch", min=1, max=max(4096, batch_size))}


def _export_program(model: nn.Module, example: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    shapes = (_batch_dim(example.shape[0]),) if dynamic else None
    return torch.export.export(model, (example,), dynamic_shapes=shapes)


def _write(fmt: str, model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    if fmt == "torchscript":
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
    elif fmt == "exported-program":
        torch.export.save(_export_program(model, example, dynamic), str(path))
    else:
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=(_batch_dim(example.shape[0]),) if dynamic else None,
            external_data=big,
            verbose=False,
        )


def _runner(fmt: str, path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Load the written file back and return a function running it, and the runtime's name."""
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path), map_location="cpu")
        return (lambda x: loaded(x)), "torch.jit.load"
    if fmt == "exported-program":
        module = torch.export.load(str(path)).module()
        return (lambda x: module(x)), "torch.export.load"
    try:
        import onnxruntime as ort
    except ImportError:
        raise VitshrinkError(
            f"Checking the ONNX graph needs onnxruntime, which is not installed: {ONNX_EXTRA}, or pass --no-check."
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run, f"onnxruntime {ort.__version__}"


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise VitshrinkError(f"The exported model returned {type(out).__name__}, not a tensor of logits.")
    return out.detach().float()


def _compare(
    model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor
) -> float:
    with torch.no_grad():
        ref = _logits(model(inputs))
        got = _logits(run(inputs.clone()))
    if got.shape != ref.shape:
        raise VitshrinkError(f"output shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)}")
    return float((got - ref).abs().max())


# ---------------------------------------------------------------- the export
def export_model(
    source: str | os.PathLike,
    fmt: Format | str,
    output: Path | None = None,
    *,
    overwrite: bool = False,
    batch_size: int = 1,
    check: bool = True,
    tolerance: float = 1e-3,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> ExportResult:
    """Export ``source`` (a vitshrink output folder or any model source) to ``fmt`` at ``output``.

    The file is written to a temporary name, checked against PyTorch on random inputs of
    ``batch_size`` (and of another batch size, for a dynamic batch dimension), and moved into place
    only when ``max_abs_diff <= tolerance * max(1, max |logits|)``.
    """
    fmt = _check_format(str(fmt))
    if batch_size < 1:
        raise VitshrinkError(f"--batch-size must be at least 1, got {batch_size}.")
    output = Path(output) if output is not None else default_output(str(source), fmt)
    _check_output(output, overwrite=overwrite)
    if fmt == "onnx":
        _onnx_modules()

    from vitshrink.measure import input_size_of
    from vitshrink.sources import load_model

    model = load_model(source, arch=arch, trust_pickle=trust_pickle).float().eval()
    input_size = tuple(int(v) for v in input_size_of(model))
    gen = torch.Generator().manual_seed(0)
    # A batch of 1 would make torch.export specialise the batch dimension: trace with at least 2.
    example = torch.randn(max(2, batch_size), *input_size, generator=gen)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        staged = tmp_dir / output.name
        dynamic = fmt != "torchscript"
        with _quiet():
            try:
                _write(fmt, model, example if dynamic else example[:batch_size], staged, dynamic)
            except Exception as exc:
                if not dynamic:
                    raise _export_error(fmt, exc) from exc
                # Some rewrites specialise on the batch size: fall back to a static one.
                for leftover in tmp_dir.iterdir():
                    leftover.unlink()
                dynamic = False
                try:
                    _write(fmt, model, example[:batch_size], staged, dynamic)
                except Exception as exc2:
                    raise _export_error(fmt, exc2) from exc2

        diff, checked_with = None, None
        if check:
            diff, checked_with, dynamic = _check(fmt, model, staged, input_size, batch_size, dynamic, gen, tolerance)
        elif fmt == "torchscript":
            dynamic = False  # a trace may fix the batch size: unknown without the check
        extra = []
        for file in sorted(tmp_dir.iterdir()):
            target = output.parent / file.name
            if file.name != output.name:
                extra.append(target)
            os.replace(file, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(output, fmt, diff, input_size, dynamic, checked_with, tuple(extra))


def _check(
    fmt: str,
    model: nn.Module,
    path: Path,
    input_size: tuple[int, ...],
    batch_size: int,
    dynamic: bool,
    gen: torch.Generator,
    tolerance: float,
) -> tuple[float, str, bool]:
    """Run the written file on random inputs; (max abs diff, runtime, batch dimension is dynamic)."""
    with _quiet():
        run, checked_with = _runner(fmt, path)
        x = torch.randn(batch_size, *input_size, generator=gen)
        try:
            diffs = [_compare(model, run, x)]
        except VitshrinkError:
            raise
        except Exception as exc:
            raise VitshrinkError(f"The {fmt} export does not run at batch size {batch_size}: {_one_line(exc)}") from exc
        with torch.no_grad():
            scale = float(_logits(model(x)).abs().max())
        limit = tolerance * max(1.0, scale)
        other = batch_size + 1 if batch_size < 4 else batch_size - 1
        if dynamic or fmt == "torchscript":
            try:
                second = _compare(model, run, torch.randn(other, *input_size, generator=gen))
            except Exception as exc:
                if fmt != "torchscript":
                    raise VitshrinkError(
                        f"The {fmt} export fails at batch size {other} although its batch dimension is "
                        f"dynamic: {_one_line(exc)}"
                    ) from exc
                second = math.inf
            if fmt == "torchscript":
                dynamic = second <= limit  # a trace may have fixed the batch size
            if dynamic:
                diffs.append(second)
    diff = max(diffs)
    if not math.isfinite(diff) or diff > limit:
        raise VitshrinkError(
            f"The {fmt} export differs from PyTorch by up to {diff:.3g} (allowed {limit:.3g}): not written. "
            "Try another --format."
        )
    return diff, checked_with, dynamic


def _export_error(fmt: str, exc: BaseException) -> VitshrinkError:
    if isinstance(exc, VitshrinkError):
        return exc
    other = [f for f in FORMATS if f != fmt]
    return VitshrinkError(
        f"This model cannot be exported to {fmt}: {_one_line(exc)}. Try --format {' or '.join(other)}."
    )
