"""`vitshrink init`: a randomly initialised timm model, optionally DCT-initialised, for training from scratch.

``register(app)`` adds the command to the main Typer app (idempotent). The library side is
:func:`init_model` (build and initialise) and :func:`write_init` (build and write the folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from vitshrink.errors import VitshrinkError

out = Console()
err = Console(stderr=True)

DCT_INIT_CHOICES = ("q", "k", "v", "qkv")
"""Values of ``--dct-init``: which block(s) of every attention's fused qkv weight become the DCT matrix."""

ArchArg = Annotated[
    str,
    typer.Argument(
        metavar="ARCH",
        help="A timm architecture name or alias (see `vitshrink models`), e.g. vit_tiny_patch16_224 or swin_tiny.",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output",
        "-o",
        help="Folder to write (timm's Hub layout: config.json + model.safetensors).",
        show_default=False,
    ),
]
DctInitOpt = Annotated[
    str | None,
    typer.Option(
        "--dct-init",
        help="Set the q, k, v (or all three: qkv) block of every attention's qkv weight to the orthonormal "
        "DCT-II matrix (Pan et al. 2024). Default: timm's random init only.",
        show_default=False,
    ),
]
NumClassesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-classes", min=1, help="Classifier outputs (default: the architecture's).", show_default=False
    ),
]
ImgSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--img-size", min=1, help="Input image size (default: the architecture's).", show_default=False
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random initialisation.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]


@dataclass
class InitResult:
    """What :func:`write_init` wrote."""

    output: Path
    architecture: str
    params: int
    dct_init: str | None
    attentions: int
    input_size: tuple[int, ...]
    num_classes: int


def _check_dct_init(which: str | None) -> str | None:
    if which is None or which.lower() == "none":
        return None
    if which.lower() not in DCT_INIT_CHOICES:
        raise VitshrinkError(f"--dct-init '{which}' is not one of {', '.join(DCT_INIT_CHOICES)} (or none).")
    return which.lower()


def init_model(
    arch: str,
    *,
    dct_init: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    seed: int = 0,
) -> tuple[nn.Module, int]:
    """Build ``arch`` with random weights (seeded) and DCT-initialise its attentions when asked.

    Returns the model (eval mode, CPU) and how many attentions were DCT-initialised.
    """
    import timm
    import torch

    from vitshrink.dct_init import apply_dct_init
    from vitshrink.sources import resolve_name

    which = _check_dct_init(dct_init)
    name = resolve_name(arch)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # timm raises TypeError / AssertionError / ValueError for unsupported arguments
        lines = str(exc).strip().splitlines()
        given = f" with {', '.join(f'{k}={v}' for k, v in kwargs.items())}" if kwargs else ""
        raise VitshrinkError(
            f"Could not build '{name}'{given}: {lines[0] if lines else type(exc).__name__}"
        ) from exc
    count = apply_dct_init(model, which) if which else 0
    return model.eval(), count


def write_init(
    arch: str,
    output: str | Path,
    *,
    dct_init: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> InitResult:
    """Build and initialise ``arch`` (see :func:`init_model`), then write it atomically to ``output``."""
    from timm.models._hub import save_for_hf

    from vitshrink import __version__
    from vitshrink.checkpoint import atomic_dir, check_output_dir

    output = Path(output)
    which = _check_dct_init(dct_init)
    check_output_dir(output, overwrite=overwrite)
    model, count = init_model(arch, dct_init=which, num_classes=num_classes, img_size=img_size, seed=seed)
    info = {"source": arch, "dct_init": which, "seed": seed, "vitshrink_version": __version__}
    with atomic_dir(output, overwrite=overwrite) as tmp:
        save_for_hf(model, tmp, model_config={"vitshrink_init": info}, safe_serialization=True)
    return InitResult(
        output=output,
        architecture=str(model.pretrained_cfg.get("architecture", arch)),
        params=sum(p.numel() for p in model.parameters()),
        dct_init=which,
        attentions=count,
        input_size=tuple(model.pretrained_cfg.get("input_size", ())),
        num_classes=int(model.num_classes),
    )


def init_cmd(
    arch: ArchArg,
    output: OutputOpt,
    dct_init: DctInitOpt = None,
    num_classes: NumClassesOpt = None,
    img_size: ImgSizeOpt = None,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a randomly initialised model (optionally DCT-initialised) to train from scratch."""
    with err.status(f"Building {arch}"):
        result = write_init(
            arch,
            output,
            dct_init=dct_init,
            num_classes=num_classes,
            img_size=img_size,
            seed=seed,
            overwrite=overwrite,
        )
    table = Table(title=f"Initialised {result.architecture}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("parameters (M)", f"{result.params / 1e6:.3f}")
    table.add_row("input", "x".join(str(v) for v in result.input_size))
    table.add_row("classes", str(result.num_classes))
    table.add_row("seed", str(seed))
    table.add_row(
        "DCT init",
        f"{result.dct_init} block of {result.attentions} attentions"
        if result.dct_init
        else "none (timm's random init)",
    )
    out.print(table)
    out.print(f"Wrote [bold]{result.output}[/] (config.json, model.safetensors)")


def register(app: typer.Typer) -> None:
    """Add `init` to ``app`` (a second call does nothing)."""
    if "init" not in {info.name for info in app.registered_commands}:
        app.command("init")(init_cmd)
