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


# ---------------------------------------------------------------- entry point
def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    warnings.formatwarning = _format_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        app(args=argv, standalone_mode=False)
    except VitshrinkError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: nothing was written at the output path.")
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
