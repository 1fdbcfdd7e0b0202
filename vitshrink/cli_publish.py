"""`vitshrink push` and `vitshrink export`: publish an output folder, export it for deployment.

``register(app)`` adds both commands to the main Typer app (idempotent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)

COMMANDS = ("push", "export")

OutDirArg = Annotated[
    Path,
    typer.Argument(help="A vitshrink output folder (from `vitshrink compress`).", show_default=False),
]
SourceArg = Annotated[
    str,
    typer.Argument(
        metavar="OUT_DIR",
        help="A vitshrink output folder, or any model source (timm name, hf-hub:org/name, a timm Hub-layout folder).",
        show_default=False,
    ),
]
RepoIdOpt = Annotated[str, typer.Option("--repo-id", help="Hub repository, org/name (created if missing).", show_default=False)]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the repository as private.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Branch to push to (created if missing; default main).")]
CreatePrOpt = Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing directly.")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hub token with write access. Prefer `hf auth login` or HF_TOKEN: a token on the command line "
        "ends up in shell history.",
        show_default=False,
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Write the folder that would be uploaded; no network.")]
DryRunDirOpt = Annotated[
    Path | None,
    typer.Option("--dry-run-dir", help="Where --dry-run writes the upload folder (default: OUT_DIR-upload beside it)."),
]
LicenseOpt = Annotated[
    str | None,
    typer.Option("--license", help="Licence id for the model card (default: the base model's, when known)."),
]
FormatOpt = Annotated[
    str,
    typer.Option("--format", "-f", help="onnx, torchscript or exported-program.", show_default=False),
]
ExportOutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", help="Output file (default: OUT_DIR.onnx / .pt / .pt2 beside the folder)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch size of the example and check inputs.")]
NoCheckOpt = Annotated[bool, typer.Option("--no-check", help="Skip running the export against PyTorch.")]


def _size(num: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1024 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024  # type: ignore[assignment]
    return f"{num} B"


def push_cmd(
    out_dir: OutDirArg,
    repo_id: RepoIdOpt,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    create_pr: CreatePrOpt = False,
    token: TokenOpt = None,
    dry_run: DryRunOpt = False,
    dry_run_dir: DryRunDirOpt = None,
    license: LicenseOpt = None,
) -> None:
    """Upload an output folder to the Hugging Face Hub with a generated model card."""
    from vitshrink.publish import push

    if dry_run:
        result = push(out_dir, repo_id, private=private, revision=revision, create_pr=create_pr,
                      dry_run=True, dry_run_dir=dry_run_dir, license=license)
    else:
        with err.status(f"Uploading {out_dir} to {repo_id}"):
            result = push(out_dir, repo_id, private=private, revision=revision, create_pr=create_pr,
                          token=token, license=license)
    title = f"Dry run for {result.repo_id}: nothing uploaded" if result.dry_run else f"Pushed to {result.repo_id}"
    table = Table(title=title)
    table.add_column("file")
    table.add_column("size", justify="right")
    for name in result.files:
        table.add_row(name, _size(result.sizes.get(name, 0)))
    out.print(table)
    if result.dry_run:
        out.print(f"Upload folder: {result.folder}")
    else:
        out.print(f"[green]Done[/]: {result.url}")


def export_cmd(
    source: SourceArg,
    fmt: FormatOpt,
    output: ExportOutputOpt = None,
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 1,
    no_check: NoCheckOpt = False,
) -> None:
    """Export to ONNX, TorchScript or a torch.export program, checked against PyTorch."""
    from vitshrink.export import export_model

    with err.status(f"Exporting {source} to {fmt}"):
        result = export_model(source, fmt, output, overwrite=overwrite, batch_size=batch_size, check=not no_check)
    table = Table(title=f"Exported {source} ({result.format})", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("file", str(result.path))
    for extra in result.extra_files:
        table.add_row("weights", str(extra))
    table.add_row("input", "N x " + "x".join(str(v) for v in result.input_size))
    table.add_row("batch dimension", "dynamic" if result.dynamic_batch else f"fixed at {batch_size}")
    if result.max_abs_diff is not None:
        table.add_row("max abs diff vs PyTorch", f"{result.max_abs_diff:.3g} ({result.checked_with})")
    else:
        table.add_row("max abs diff vs PyTorch", "not checked")
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add `push` and `export` to ``app`` (a second call does nothing)."""
    names = {info.name for info in app.registered_commands}
    if "push" not in names:
        app.command("push")(push_cmd)
    if "export" not in names:
        app.command("export")(export_cmd)
