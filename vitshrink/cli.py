"""The `vitshrink` command line: parses, calls the library, renders with rich."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vitshrink import __version__
from vitshrink.errors import VitshrinkError

app = typer.Typer(
    name="vitshrink",
    help="Make pretrained Vision Transformers faster after training: calibrate, rewrite, distil, ship.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True)

# ---------------------------------------------------------------- shared options
ModelArg = Annotated[
    str,
    typer.Argument(
        help="A timm name or alias (see `vitshrink models`), hf-hub:org/name, a folder in timm's Hub layout "
        "(also a vitshrink output), a .safetensors file (with --arch), or vitshrink:fashion-vit.",
        show_default=False,
    ),
]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Architecture for a bare weights file, e.g. deit_tiny_patch16_224.")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow pickled .pth/.bin checkpoints (loaded weights-only). Only for files you trust.")]
RandomOpt = Annotated[bool, typer.Option("--random-init", help="Build the architecture with random weights (speed does not depend on them).")]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="Images: a folder (imagefolder with metadata.csv, class sub-folders, or flat), a datasets folder, "
        "a Hub dataset id, or a name: imagenet-val, imagenet-sample-dev, fashion-mnist-sample.",
    ),
]
SplitOpt = Annotated[str | None, typer.Option("--split", help="Dataset split (e.g. validation, test, train).")]
ImageKeyOpt = Annotated[str | None, typer.Option("--image-key", help="Image column of a datasets source.")]
LabelKeyOpt = Annotated[str | None, typer.Option("--label-key", help="Label column of a datasets source.")]
NumSamplesOpt = Annotated[int | None, typer.Option("--num-samples", "-n", help="Use a deterministic subset of this many images.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps.")]
AmpOpt = Annotated[str | None, typer.Option("--amp", help="Autocast precision: bf16 or fp16 (default: fp32).")]
ChannelsLastOpt = Annotated[bool, typer.Option("--channels-last", help="Run in channels-last memory format.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model before measuring.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size for evaluation and throughput.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: torch's choice).")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Write the report JSON here (and a .md beside it).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"vitshrink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """vitshrink: compress pretrained ViT, DeiT and Swin models."""


def _settings(device: str, amp: str | None, channels_last: bool, compile: bool):
    from vitshrink.measure import RunSettings

    return RunSettings(device=device, amp=amp, channels_last=channels_last, compile=compile)


def _load(model: str, arch: str | None, trust_pickle: bool, random_init: bool = False):
    from vitshrink.sources import load_model

    with err.status(f"Loading {model}"):
        return load_model(model, arch=arch, trust_pickle=trust_pickle, pretrained=not random_init)


def _check_output_file(path: Path | None, overwrite: bool) -> None:
    if path is None:
        return
    for p in (path, path.with_suffix(".md")):
        if p.exists() and not overwrite:
            raise VitshrinkError(f"'{p}' already exists: choose another --output or pass --overwrite.")
    if not path.parent.exists():
        raise VitshrinkError(f"Folder '{path.parent}' for --output does not exist: create it first.")


def _write_report_file(path: Path, report: dict[str, Any], markdown: str) -> None:
    from vitshrink.report import write_report

    write_report(path.parent, report, markdown, stem=path.stem if path.suffix == ".json" else path.name)


# ---------------------------------------------------------------- commands
@app.command()
def models(
    all_timm: Annotated[str | None, typer.Option("--timm", help="Also list timm models matching this pattern, e.g. 'deit*'.")] = None,
) -> None:
    """List the short model names vitshrink understands (and timm models by pattern)."""
    from vitshrink.sources import describe_sources

    table = Table(title="Model names", show_lines=False)
    table.add_column("name")
    table.add_column("resolves to")
    for name, target in describe_sources():
        table.add_row(name, target)
    out.print(table)
    if all_timm:
        import timm

        names = timm.list_models(all_timm)
        out.print(f"{len(names)} timm models match '{all_timm}':")
        out.print(", ".join(names) or "(none)")
    out.print("Also: hf-hub:org/name, a local folder in timm's Hub layout, or a .safetensors file with --arch.")


@app.command()
def methods() -> None:
    """List the compression methods and their knobs."""
    from vitshrink.methods import METHODS

    table = Table(title="Methods (compose with '+', e.g. dgssa+glad)")
    table.add_column("method")
    table.add_column("knob")
    table.add_column("default")
    table.add_column("meaning")
    for name in sorted(METHODS):
        cls = METHODS[name]
        first = True
        for knob, default in cls.defaults.items():
            table.add_row(name if first else "", knob, str(default), cls.help.get(knob, ""))
            first = False
        if first:
            table.add_row(name, "", "", (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
    out.print(table)


@app.command("eval")
def eval_cmd(
    model: ModelArg,
    data: DataOpt = None,
    reference: Annotated[str | None, typer.Option("--reference", help="Compare predictions with this model (any model source).")] = None,
    split: SplitOpt = None,
    image_key: ImageKeyOpt = None,
    label_key: LabelKeyOpt = None,
    num_samples: NumSamplesOpt = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "cpu",
    amp: AmpOpt = None,
    channels_last: ChannelsLastOpt = False,
    compile: CompileOpt = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="DataLoader worker processes.")] = 0,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs for throughput (median taken).")] = 10,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="Skip throughput, latency and memory.")] = False,
    threads: ThreadsOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Accuracy, agreement with a reference, parameters, GFLOPs, throughput, latency and peak memory."""
    from vitshrink.data import resolve_data
    from vitshrink.evaluate import eval_report
    from vitshrink.measure import threads as set_threads
    from vitshrink.report import eval_markdown

    _check_output_file(output, overwrite)
    settings = _settings(device, amp, channels_last, compile)
    net = _load(model, arch, trust_pickle)
    ref = _load(reference, None, trust_pickle) if reference else None
    source = (
        resolve_data(data, split=split, image_key=image_key, label_key=label_key, num_samples=num_samples)
        if data
        else None
    )
    with set_threads(threads):
        report = eval_report(
            net, source, model_source=model, reference=ref, reference_source=reference, settings=settings,
            batch_size=batch_size, workers=workers, speed=not no_speed, runs=runs, progress=not quiet,
        )
    markdown = eval_markdown(report)
    _print_eval(report)
    if output:
        _write_report_file(output, report, markdown)
        err.print(f"Wrote {output} and {output.with_suffix('.md')}")


def _print_eval(report: dict[str, Any]) -> None:
    from vitshrink.report import METRICS, _fmt, flat_metrics

    flat = flat_metrics(report)
    table = Table(title=f"{report['model']['source']}" + (f" on {report['data']['source']}" if report.get("data") else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    if report.get("data"):
        table.add_row("images", str(report["data"]["images"]) + (f" ({report['data']['skipped']} skipped)" if report["data"]["skipped"] else ""))
    for key, label, kind in METRICS:
        if flat.get(key) is not None:
            table.add_row(label, _fmt(flat[key], kind))
    if flat.get("reference_top1") is not None:
        table.add_row("reference top-1", _fmt(flat["reference_top1"], "pct"))
    out.print(table)


@app.command()
def bench(
    models_: Annotated[list[str], typer.Argument(metavar="MODEL...", help="Models to compare; ratios are against the first.", show_default=False)],
    batch_size: BatchOpt = 32,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Interleaved rounds (one timed batch per model each).")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up batches per model.")] = 2,
    random_init: RandomOpt = False,
    device: DeviceOpt = "cpu",
    amp: AmpOpt = None,
    channels_last: ChannelsLastOpt = False,
    compile: CompileOpt = False,
    threads: ThreadsOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Throughput of several models side by side in one interleaved run (A B A B ...), with ratios."""
    from vitshrink.bench import bench as run_bench
    from vitshrink.measure import input_size_of
    from vitshrink.measure import threads as set_threads
    from vitshrink.report import machine_info, markdown_table, now_iso

    _check_output_file(output, overwrite)
    settings = _settings(device, amp, channels_last, compile)
    loaded = [(name, net, input_size_of(net)) for name in models_ for net in [_load(name, arch, trust_pickle, random_init)]]
    with set_threads(threads):
        rows = run_bench(loaded, settings, batch_size=batch_size, rounds=rounds, warmup=warmup, progress=not quiet)
    table = Table(title=f"Throughput, batch {batch_size}, {device}" + (f", {amp}" if amp else ", fp32"))
    for col in ("model", "img/s", "ratio", "GFLOPs", "params (M)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(row.name, f"{row.images_per_second:.1f}", f"{row.ratio:.2f}x",
                      f"{row.gflops:.3f}" if row.gflops is not None else "-", f"{row.params_m:.2f}")
    out.print(table)
    if output:
        report = {
            "vitshrink_version": __version__, "created": now_iso(), "machine": machine_info(device),
            "settings": {"batch_size": batch_size, "rounds": rounds, "warmup": warmup, "device": device, "amp": amp,
                         "channels_last": channels_last, "compile": compile, "random_init": random_init},
            "models": [r.to_dict() for r in rows],
        }
        md = "# vitshrink bench\n\n" + markdown_table(
            ["model", "img/s", "ratio", "GFLOPs", "params (M)"],
            [[r.name, f"{r.images_per_second:.1f}", f"{r.ratio:.2f}x", f"{r.gflops:.3f}" if r.gflops else "-", f"{r.params_m:.2f}"] for r in rows],
        ) + f"\n\nMachine: {report['machine']['processor']}, {report['machine']['cpu_count']} cores, batch {batch_size}.\n"
        _write_report_file(output, report, md)
        err.print(f"Wrote {output}")


def _parse_set(values: list[str]) -> dict[str, dict[str, Any]]:
    """--set glad.tokens=98,49 --set dgssa.layers=0-3 -> {'glad': {'tokens': '98,49'}, ...}."""
    import yaml

    knobs: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, value = item.partition("=")
        method, dot, knob = key.partition(".")
        if not sep or not dot or not method or not knob:
            raise VitshrinkError(f"--set '{item}' must look like method.knob=value, e.g. --set glad.tokens=98,49.")
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            parsed = value
        knobs.setdefault(method.strip(), {})[knob.strip()] = parsed
    return knobs


def _build_compress_config(args: dict[str, Any]):
    """Recipe values first, then explicit CLI options on top, then built-in defaults."""
    from dataclasses import fields

    from vitshrink.compress import CompressConfig
    from vitshrink.finetune import FinetuneConfig
    from vitshrink.methods import get_method, parse_method_string
    from vitshrink.recipes import load_recipe

    recipe = load_recipe(args["recipe"]) if args["recipe"] else {}
    method = args["method"] or recipe.get("method")
    if not method:
        raise VitshrinkError("Say which methods to apply: --method dgssa+glad (see `vitshrink methods`) or --recipe NAME.")
    names = parse_method_string(method)
    knobs: dict[str, dict[str, Any]] = {k: dict(v or {}) for k, v in (recipe.get("knobs") or {}).items()}
    if args["method"] and recipe:  # a recipe's knobs only apply to methods still asked for
        knobs = {k: v for k, v in knobs.items() if k in names}
    if args["layers"] is not None:
        for name in names:
            if "layers" in get_method(name).defaults:
                knobs.setdefault(name, {})["layers"] = args["layers"]
    explicit = {
        ("dgssa", "layers"): args["dgssa_layers"], ("glad", "layers"): args["glad_layers"],
        ("glad", "tokens"): args["glad_tokens"], ("glad", "init"): args["glad_init"],
        ("tome", "r"): args["tome_r"], ("dct", "keep"): args["dct_keep"], ("dct", "basis"): args["dct_basis"],
        ("dual", "layers"): args["dual_layers"], ("dual", "tokens"): args["dual_tokens"],
    }
    for (name, knob), value in explicit.items():
        if value is None:
            continue
        if name not in names:
            raise VitshrinkError(f"--{name}-{knob} given but '{name}' is not in --method {method}.")
        knobs.setdefault(name, {})[knob] = value
    for name, values in _parse_set(args["set_"] or []).items():
        knobs.setdefault(name, {}).update(values)

    ft_values = dict(recipe.get("finetune") or {})
    for key in ("steps", "lr", "grad_accum", "temperature", "class_token_weight", "mixed_precision", "seed"):
        if args[key] is not None:
            ft_values[key] = args[key]
    if args["batch_size"] is not None:
        ft_values["batch_size"] = args["batch_size"]
    finetune = FinetuneConfig(**{k: v for k, v in ft_values.items() if k in {f.name for f in fields(FinetuneConfig)}})
    calib_cfg = dict(recipe.get("calibration") or {})
    model = args["model"] or recipe.get("model")
    calib = args["calib"] or calib_cfg.pop("calib", None)
    if not model:
        raise VitshrinkError("Say which model to compress: vitshrink compress MODEL --method ... (see `vitshrink models`).")
    if not calib:
        raise VitshrinkError("Say which images to calibrate on: --calib FOLDER or a name such as imagenet-val.")
    for key in ("num_calib", "eval_fraction", "analysis_images", "num_eval", "eval_data", "bench_batch_size", "bench_rounds"):
        if args.get(key) is not None:
            calib_cfg[key] = args[key]
    return CompressConfig(
        model=model, method=method, calib=calib, knobs=knobs, calib_split=args["split"], image_key=args["image_key"],
        label_key=args["label_key"], finetune=finetune, output=args["output"], overwrite=args["overwrite"],
        resume=args["resume"], arch=args["arch"], trust_pickle=args["trust_pickle"], speed=not args["no_speed"],
        **{k: v for k, v in calib_cfg.items() if v is not None},
    )


@app.command()
def compress(
    model: Annotated[str | None, typer.Argument(help="The model to compress (any model source; see `vitshrink eval --help`). May come from --recipe.", show_default=False)] = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="Methods joined by '+', applied in order: dgssa, glad, tome, dct, dual (see `vitshrink methods`).")] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", "-r", help="A recipe name (recipes/NAME.yaml) or YAML path: method, knobs, fine-tune settings. Options given here override it.")] = None,
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration images (any data source; labels not needed). Part of them is held out for evaluation unless --eval-data is given.")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval-data", help="Held-out evaluation images (default: the part of --calib not used for training).")] = None,
    eval_fraction: Annotated[float | None, typer.Option("--eval-fraction", help="Share of --calib held out for evaluation when --eval-data is not given (default: 0.5).")] = None,
    num_calib: Annotated[int | None, typer.Option("--num-calib", help="Calibration/training images to use (deterministic subset) (default: all).")] = None,
    num_eval: Annotated[int | None, typer.Option("--num-eval", help="Held-out images to evaluate on (default: all).")] = None,
    analysis_images: Annotated[int | None, typer.Option("--analysis-images", help="Images for the attention analysis and initialisation (default: 64).")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Blocks for every method with a 'layers' knob: 'auto' (from the analysis), or e.g. '0-3' / '6,9'.")] = None,
    dgssa_layers: Annotated[str | None, typer.Option("--dgssa-layers", help="dgssa: blocks whose attention becomes static ('auto' or e.g. 0-3).")] = None,
    glad_layers: Annotated[str | None, typer.Option("--glad-layers", help="glad: blocks before which tokens are reduced ('auto' or e.g. 6,9).")] = None,
    glad_tokens: Annotated[str | None, typer.Option("--glad-tokens", help="glad: patch tokens kept per stage, e.g. 98,49.")] = None,
    glad_init: Annotated[str | None, typer.Option("--glad-init", help="glad: pool or pca.")] = None,
    tome_r: Annotated[str | None, typer.Option("--tome-r", help="tome: tokens merged per block (int, fraction, or 'auto').")] = None,
    dct_keep: Annotated[str | None, typer.Option("--dct-keep", "--keep", help="dct: share tau of channels kept, e.g. 0.5 (or one per layer: 0.75,0.5,...).")] = None,
    dct_basis: Annotated[str | None, typer.Option("--dct-basis", "--basis", help="dct: dct, pca (calibration tokens) or svd (weights).")] = None,
    dual_layers: Annotated[str | None, typer.Option("--dual-layers", help="dual: blocks that get the dual pathway.")] = None,
    dual_tokens: Annotated[int | None, typer.Option("--dual-tokens", help="dual: semantic tokens M (a square, e.g. 49 or 16).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any knob: method.knob=value (repeatable), e.g. --set glad.bias=false.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=0, help="Fine-tune optimizer steps; 0 skips the fine-tune (default: 300).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (AdamW, cosine) (default: 1e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, help="Fine-tune batch size per process (default: 32).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", min=1, help="Gradient accumulation steps (default: 1).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", help="Distillation temperature (default: 2).")] = None,
    class_token_weight: Annotated[float | None, typer.Option("--class-token-weight", min=0.0, help="Weight of matching the teacher's class token after every block (0 turns it off) (default: 1).")] = None,
    mixed_precision: Annotated[str | None, typer.Option("--mixed-precision", help="auto (bf16 where the GPU supports it), no, bf16, fp16.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for data order and splits (default: 0).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (default: out/<model>-<methods>).")] = None,
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fine-tune from its last saved state.")] = False,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="Skip the throughput comparison.")] = False,
    bench_batch_size: Annotated[int | None, typer.Option("--bench-batch-size", help="Batch size of the throughput comparison (default: 32).")] = None,
    bench_rounds: Annotated[int | None, typer.Option("--bench-rounds", help="Interleaved rounds of the throughput comparison (default: 10).")] = None,
    split: SplitOpt = None,
    image_key: ImageKeyOpt = None,
    label_key: LabelKeyOpt = None,
    threads: ThreadsOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress a model: analyse attention, rewrite with the methods, distil from the original, evaluate, save.

    Writes OUTPUT/config.json + model.safetensors (load with vitshrink.load or any command's MODEL),
    report.json, report.md and the analysis plot.
    """
    from vitshrink.compress import compress as run_compress
    from vitshrink.measure import threads as set_threads

    config = _build_compress_config(dict(locals()))
    with set_threads(threads):
        result = run_compress(config, progress=not quiet)
    _print_compress(result.report)
    if result.output is not None:
        out.print(f"Wrote [bold]{result.output}[/] (config.json, model.safetensors, report.json, report.md)")


def _print_compress(report: dict[str, Any]) -> None:
    from vitshrink.report import METRICS, _fmt

    table = Table(title=f"{report['model']['source']} with {'+'.join(m['name'] for m in report['methods'])}")
    table.add_column("metric")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    cols = []
    for key in ("original", "compressed"):
        part = report.get(key, {})
        cols.append({**part.get("accuracy", {}), **part.get("cost", {}), **part.get("throughput", {})})
    for key, label, kind in METRICS:
        if cols[0].get(key) is not None or cols[1].get(key) is not None:
            table.add_row(label, _fmt(cols[0].get(key), kind), _fmt(cols[1].get(key), kind))
    out.print(table)
    if report.get("speed"):
        out.print(f"Speed-up: [bold]{report['speed']['ratio']:.2f}x[/] throughput (batch {report['speed']['batch_size']}, same run)")


@app.command()
def analyze(
    model: ModelArg,
    calib: Annotated[str, typer.Option("--calib", help="Calibration images (any data source).")],
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="Images to analyse.")] = 64,
    split: SplitOpt = None,
    image_key: ImageKeyOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for analysis.json and analysis.png (default: out/<model>-analysis).")] = None,
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 32,
    threads: ThreadsOpt = None,
    arch: ArchOpt = None,
    trust_pickle: TrustOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Per-layer attention statistics: similarity across images and effective rank; suggests layers."""
    import re

    import torch

    from vitshrink.analysis import analyze_attention
    from vitshrink.checkpoint import atomic_dir
    from vitshrink.data import load_images, resolve_data
    from vitshrink.measure import threads as set_threads

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.rstrip("/").split("/")[-1].split(":")[-1]).strip("-")
    folder = output or Path("out") / f"{name}-analysis"
    from vitshrink.checkpoint import check_output_dir

    check_output_dir(folder, overwrite=overwrite)
    net = _load(model, arch, trust_pickle)
    source = resolve_data(calib, split=split, image_key=image_key, num_samples=num_samples)
    images, _ = load_images(source, net)
    with set_threads(threads), torch.inference_mode():
        analysis = analyze_attention(net, images, batch_size=batch_size, progress=not quiet)
    suggested = analysis.suggest_layers()
    table = Table(title=f"Attention analysis of {model} on {len(images)} images")
    for col in ("block", "similarity", "eff. rank", "rank / N", "suggested"):
        table.add_column(col, justify="right")
    for stats in analysis.layers:
        mark = ", ".join(k for k, v in suggested.items() if stats.index in v)
        table.add_row(str(stats.index), f"{stats.similarity:.3f}", f"{stats.effective_rank:.1f}",
                      f"{stats.effective_rank_fraction:.3f}", mark)
    out.print(table)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        analysis.save(tmp, suggested)
    out.print(f"Wrote {folder / 'analysis.json'} and {folder / 'analysis.png'}")


@app.command()
def convert(
    family: Annotated[str, typer.Argument(help="Checkpoint family: dualvit.", show_default=False)],
    checkpoint: Annotated[Path, typer.Argument(help="The official checkpoint (e.g. dualvit_s.pth.tar).", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (timm's Hub layout: config.json + model.safetensors).", show_default=False)],
    variant: Annotated[str | None, typer.Option("--variant", help="s, b, l (or dualvit_s.in1k_384); detected from the weights when left out.")] = None,
    trust_pickle: TrustOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert an official checkpoint into a safetensors folder that timm and vitshrink load."""
    if family != "dualvit":
        raise VitshrinkError(f"Unknown checkpoint family '{family}': supported: dualvit.")
    from vitshrink.convert import convert_dualvit

    if not checkpoint.is_file():
        raise VitshrinkError(f"Checkpoint '{checkpoint}' does not exist.")
    with err.status(f"Converting {checkpoint}"):
        folder = convert_dualvit(checkpoint, out_dir, variant=variant, trust_pickle=trust_pickle, overwrite=overwrite)
    out.print(f"Wrote [bold]{folder}[/] (config.json, model.safetensors): load it with `vitshrink eval {folder}` "
              f"or timm.create_model('local-dir:{folder}') after `import vitshrink.models`.")


from vitshrink.cli_publish import register as _register_publish  # noqa: E402

_register_publish(app)

from vitshrink.cli_init import register as _register_init  # noqa: E402

_register_init(app)


# ---------------------------------------------------------------- entry point
def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    warnings.formatwarning = _format_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        app(args=argv, standalone_mode=False, prog_name="vitshrink")
    except VitshrinkError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: nothing was written at the output path.")
        sys.exit(130)
    except Exception as exc:  # usage errors come through here with standalone_mode=False
        import click
        from rich.markup import escape
        from typer.exceptions import TyperException

        # click's own exceptions, or (typer >= 0.29) those of the click copy vendored inside typer
        if isinstance(exc, (click.exceptions.ClickException, TyperException)) and hasattr(exc, "format_message"):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            err.print(f"[bold red]error:[/] {escape(exc.format_message())}{escape(hint)}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        if isinstance(exc, (click.exceptions.Abort, typer.Abort)):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
