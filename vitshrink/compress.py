"""The compression pipeline: load, analyse, rewrite, distil, evaluate, measure, save.

Runs unchanged under ``accelerate launch`` with several processes: every process builds the same
rewritten model, the fine-tune is data-parallel, evaluation is sharded, and only the main process
measures speed and writes the output folder.
"""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.checkpoint import atomic_dir, check_output_dir, save_compressed
from vitshrink.data import (
    ImageSource,
    LabelledImages,
    load_images,
    make_dataset,
    readable_indices,
    resolve_data,
)
from vitshrink.errors import VitshrinkError
from vitshrink.finetune import FinetuneConfig, distill
from vitshrink.methods import CalibrationContext, get_method, parse_method_string

ANALYSIS_METHODS = {"dgssa", "glad"}
"""Methods whose 'auto' layer choice (and initialisation) use the attention analysis."""


@dataclass
class CompressConfig:
    """Everything `vitshrink compress` needs; recipes and CLI options fill it."""

    model: str
    method: str
    calib: str
    knobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    calib_split: str | None = None
    image_key: str | None = None
    label_key: str | None = None
    num_calib: int | None = None
    """Calibration/training images taken from --calib (deterministic subset); None: all."""
    analysis_images: int = 64
    """Images used for the attention analysis and method initialisation."""
    eval_data: str | None = None
    """Held-out evaluation data; None: the part of --calib not used for training."""
    eval_fraction: float = 0.5
    num_eval: int | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    output: Path | None = None
    overwrite: bool = False
    resume: bool = False
    arch: str | None = None
    trust_pickle: bool = False
    eval_batch_size: int = 32
    speed: bool = True
    bench_batch_size: int = 32
    bench_rounds: int = 10
    seed: int = 0

    def methods(self) -> list[str]:
        return parse_method_string(self.method)

    def default_output(self) -> Path:
        name = self.model.rstrip("/").split("/")[-1].split(":")[-1]
        name = re.sub(r"\.safetensors$", "", name)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"
        return Path("out") / f"{name}-{'-'.join(self.methods())}"


@dataclass
class CompressResult:
    output: Path | None
    report: dict[str, Any]
    model: nn.Module


def _log(enabled: bool, message: str) -> None:
    if enabled:
        from vitshrink.progress import console

        console.print(message)


def compress(config: CompressConfig, *, progress: bool = True) -> CompressResult:
    """Run the whole pipeline and write the output folder (main process only)."""
    from vitshrink import __version__
    from vitshrink.finetune import _make_accelerator
    from vitshrink.report import machine_info, now_iso
    from vitshrink.sources import load_model

    names = config.methods()
    methods = [get_method(name) for name in names]
    unknown = set(config.knobs) - set(names)
    if unknown:
        raise VitshrinkError(
            f"Knobs given for {', '.join(sorted(unknown))}, which is not in --method {config.method}."
        )
    output = Path(config.output) if config.output else config.default_output()
    if not config.resume:
        check_output_dir(output, overwrite=config.overwrite)
    state_dir = output.with_name(f".{output.name}.state")
    if config.resume and not state_dir.exists():
        raise VitshrinkError(f"Nothing to resume: no saved fine-tune state at '{state_dir}'. Run without --resume.")

    accelerator = _make_accelerator(config.finetune) if config.finetune.steps > 0 else None
    main = accelerator is None or accelerator.is_main_process
    show = progress and main
    torch.manual_seed(config.seed)

    # 1. model and data
    teacher = load_model(config.model, arch=config.arch, trust_pickle=config.trust_pickle)
    for method in methods:
        method.check(teacher)
    source = resolve_data(config.calib, split=config.calib_split, image_key=config.image_key,
                          label_key=config.label_key, seed=config.seed)
    train_src, eval_src = _split_data(config, source)
    train_src = train_src.take(config.num_calib, seed=config.seed)
    _log(show, f"Calibration/training images: {len(train_src)} from {source.name}; "
               f"held-out evaluation images: {len(eval_src)} from {eval_src.name}")

    # 2. analysis on calibration images
    calib_images, skipped = load_images(train_src.take(config.analysis_images, seed=config.seed), teacher)
    analysis = None
    if ANALYSIS_METHODS & set(names):
        from vitshrink.analysis import analyze_attention

        with torch.inference_mode():
            analysis = analyze_attention(teacher, calib_images, batch_size=config.eval_batch_size, progress=show)

    # 3. rewrite
    student = copy.deepcopy(teacher)
    ctx = CalibrationContext(images=calib_images, analysis=analysis, batch_size=config.eval_batch_size)
    applied = apply_methods(student, names, config.knobs, ctx)
    for entry in applied:
        _log(show, f"Applied [bold]{entry['name']}[/]: {entry['params']}")
    feature_layers = sorted({i for entry in applied for i in get_method(entry["name"]).distill_layers(entry["params"])})
    prefix_layers, num_prefix = class_token_layers(student, feature_layers)

    # 4. distillation fine-tune
    ft_result = None
    if config.finetune.steps > 0:
        train_set = make_dataset(train_src, teacher, training=True)
        good, bad = readable_indices(train_src)
        skipped += bad
        if not good:
            raise VitshrinkError(f"No readable training images in '{train_src.name}'.")
        ft_result = distill(
            student, teacher, LabelledImages(train_set, good), config.finetune, feature_layers=feature_layers,
            prefix_layers=prefix_layers, num_prefix_tokens=num_prefix, state_dir=state_dir, resume=config.resume,
            progress=show, accelerator=accelerator,
        )
        student = ft_result.student if ft_result.student is not None else student
    student.eval()

    # 5. held-out evaluation and speed, in the same run
    from vitshrink.evaluate import evaluate

    acc = evaluate(student, eval_src, reference=teacher, batch_size=config.eval_batch_size,
                   progress=show, accelerator=accelerator)
    report: dict[str, Any] = {
        "vitshrink_version": __version__,
        "created": now_iso(),
        "machine": machine_info("cpu" if accelerator is None else str(accelerator.device)),
        "model": {"source": config.model, "architecture": teacher.pretrained_cfg.get("architecture")},
        "methods": applied,
        "calibration": {"data": config.calib, "train_images": len(train_src), "analysis_images": len(calib_images),
                        "skipped_images": len(set(skipped))},
        "evaluation": {"data": eval_src.name, "images": acc.images, "skipped": acc.skipped},
        "finetune": {**_finetune_dict(config.finetune), **_ft_summary(ft_result),
                     "feature_layers": feature_layers, "class_token_layers": prefix_layers,
                     "processes": accelerator.num_processes if accelerator is not None else 1},
        "original": {"accuracy": {"top1": acc.reference_top1, "top5": acc.reference_top5}},
        "compressed": {"accuracy": {k: v for k, v in acc.to_dict().items() if not k.startswith("reference")}},
    }
    if main:
        for key, value in _measure(teacher, student, config, show).items():
            report[key] = {**report.get(key, {}), **value}
    if accelerator is not None:
        accelerator.wait_for_everyone()

    # 6. write the output folder atomically
    written = None
    if main:
        written = _write_output(output, student, teacher, config, applied, report, analysis)
        shutil.rmtree(state_dir, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return CompressResult(written, report, student)


def apply_methods(
    model: nn.Module, names: list[str], knobs: dict[str, dict[str, Any]], ctx: CalibrationContext | None
) -> list[dict[str, Any]]:
    """Resolve and apply each method in order; returns ``[{"name", "params"}]`` as saved in config.json."""
    applied: list[dict[str, Any]] = []
    analysis = ctx.analysis if ctx is not None else None
    for name in names:
        method = get_method(name)
        method.check(model)
        params = method.resolve(model, dict(knobs.get(name, {})), analysis)
        with torch.no_grad():
            method.apply(model, params, ctx)
        applied.append({"name": name, "params": params})
    return applied


def class_token_layers(student: nn.Module, feature_layers: list[int]) -> tuple[list[int], int]:
    """Blocks of a ViT student whose prefix (class) tokens the fine-tune matches, and how many tokens.

    Every block not already matched whole: the prefix tokens line up with the teacher's even where
    GLAD or ToMe changed the patch-token count. Models without blocks or prefix tokens (Swin, global
    average pooling) get none.
    """
    blocks = getattr(student, "blocks", None)
    prefix = int(getattr(student, "num_prefix_tokens", 0) or 0)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or prefix < 1:
        return [], 0
    whole = set(feature_layers)
    return [i for i in range(len(blocks)) if i not in whole], prefix


def _split_data(config: CompressConfig, source: ImageSource) -> tuple[ImageSource, ImageSource]:
    if config.eval_data:
        held = resolve_data(config.eval_data, num_samples=config.num_eval, seed=config.seed)
        return source, held
    if not 0 < config.eval_fraction < 1:
        raise VitshrinkError(f"--eval-fraction must be between 0 and 1, got {config.eval_fraction}.")
    if len(source) < 4:
        raise VitshrinkError(
            f"'{source.name}' has {len(source)} images: too few to split into calibration and held-out "
            "evaluation. Give more images or --eval-data."
        )
    train, held = source.split(1 - config.eval_fraction, seed=config.seed)
    return train, held.take(config.num_eval, seed=config.seed)


def _finetune_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in ("num_workers",)}


def _ft_summary(result: Any) -> dict[str, Any]:
    if result is None:
        return {"steps_done": 0}
    return {"steps_done": result.steps_done, "seconds": round(result.seconds, 1), "final_loss": result.final_loss,
            "resumed_from": result.resumed_from}


def _measure(teacher: nn.Module, student: nn.Module, config: CompressConfig, show: bool) -> dict[str, Any]:
    """GFLOPs, params, and an interleaved throughput comparison (same run) of original vs compressed."""
    from vitshrink.bench import bench
    from vitshrink.measure import RunSettings, count_gflops, count_params, input_size_of, measure_throughput

    size = input_size_of(teacher)
    out: dict[str, Any] = {}
    for key, net in (("original", teacher), ("compressed", student)):
        out[key] = {"cost": {"params_m": count_params(net) / 1e6, "gflops": count_gflops(net, size)}}
    if not config.speed:
        return out
    settings = RunSettings()
    rows = bench([("original", teacher, size), ("compressed", student, size)], settings,
                 batch_size=config.bench_batch_size, rounds=config.bench_rounds, progress=show)
    for key, row in zip(("original", "compressed"), rows, strict=True):
        lat = measure_throughput(teacher if key == "original" else student, size, settings, batch_size=1, runs=5,
                                 warmup=2, latency=False)
        out[key]["throughput"] = {"images_per_second": row.images_per_second, "batch_size": config.bench_batch_size,
                                  "latency_ms_batch1": 1e3 / lat.images_per_second}
    out["speed"] = {"ratio": rows[1].ratio, "batch_size": config.bench_batch_size, "rounds": config.bench_rounds,
                    "device": "cpu", "precision": "fp32",
                    "latency_ratio": out["original"]["throughput"]["latency_ms_batch1"]
                    / out["compressed"]["throughput"]["latency_ms_batch1"]}
    return out


def _write_output(
    output: Path, student: nn.Module, teacher: nn.Module, config: CompressConfig, applied: list[dict[str, Any]],
    report: dict[str, Any], analysis: Any,
) -> Path:
    from vitshrink.data import data_config
    from vitshrink.report import write_report

    with atomic_dir(output, overwrite=config.overwrite or config.resume) as tmp:
        save_compressed(
            student, tmp, base_architecture=teacher.pretrained_cfg.get("architecture"), methods=applied,
            source=config.model, input_size=tuple(data_config(teacher)["input_size"]),
            extra={"calibration": {"data": config.calib, "images": report["calibration"]["train_images"]}},
        )
        write_report(tmp, report, compress_markdown(report))
        if analysis is not None:
            chosen = {a["name"]: list(a["params"].get("layers", [])) for a in applied
                      if isinstance(a["params"].get("layers"), list)}
            analysis.save(tmp, chosen)
    return output


def compress_markdown(report: dict[str, Any]) -> str:
    """report.md: original vs compressed, with the machine and settings."""
    from vitshrink.report import comparison_markdown

    def flat(key: str) -> dict[str, Any]:
        part = report.get(key, {})
        merged = {**part.get("accuracy", {}), **part.get("cost", {}), **part.get("throughput", {})}
        return merged

    methods = "+".join(m["name"] for m in report["methods"])
    machine = report.get("machine", {})
    speed = report.get("speed")
    ft = report.get("finetune", {})
    lines = [
        f"Held-out evaluation: {report['evaluation']['images']} images of `{report['evaluation']['data']}`; "
        f"calibration: {report['calibration']['train_images']} images of `{report['calibration']['data']}`; "
        f"fine-tune: {ft.get('steps_done', 0)} steps"
        + (f" in {ft['seconds']:.0f} s" if ft.get("seconds") else "") + ".",
    ]
    if speed:
        lines.append(
            f"Speed-up: **{speed['ratio']:.2f}x** throughput (batch {speed['batch_size']}, {speed['precision']}, "
            f"interleaved over {speed['rounds']} rounds in the same run), {speed['latency_ratio']:.2f}x batch-1 latency."
        )
    lines.append(f"Machine: {machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores, "
                 f"torch {machine.get('torch', '?')}, {report.get('created', '')}.")
    lines.append("\nMethods: " + "; ".join(f"`{m['name']}` {m['params']}" for m in report["methods"]))
    return comparison_markdown(
        f"{report['model']['source']} with {methods}",
        [("original", flat("original")), ("compressed", flat("compressed"))],
        note="\n\n".join(lines),
    )
