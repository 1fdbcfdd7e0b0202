"""Convert third-party checkpoints into timm's Hub layout (``config.json`` + ``model.safetensors``).

So far: the official Dual-ViT checkpoints (``.pth.tar`` files from YehLi/ImageNetModel), see
:func:`convert_dualvit`. The output folder loads with ``timm.create_model('local-dir:OUT',
pretrained=True)`` once ``vitshrink.models`` is imported, or with ``vitshrink.load('OUT')``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.errors import VitshrinkError

__all__ = ["convert_dualvit", "detect_dualvit_variant", "read_checkpoint_state_dict"]

_PICKLE_HINT = "pass --trust-pickle (trust_pickle=True) if you trust the file"


def _safe_globals() -> list[Any]:
    """Harmless classes that training scripts save next to the weights (args, numpy metrics)."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        try:
            from numpy._core.multiarray import _reconstruct, scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
        allowed += [np.dtype, np.ndarray, scalar, _reconstruct]
        allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    except Exception:  # numpy missing or reorganised: the weights themselves never need it
        pass
    return allowed


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_checkpoint_state_dict(checkpoint: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a training checkpoint: a ``.safetensors`` file, or a pickle only with ``trust_pickle``.

    A pickle may hold the state dict directly or under ``state_dict`` (preferred: the official
    Dual-ViT evaluation weights), ``model`` / ``model.state_dict`` or ``state_dict_ema``; DataParallel
    ``module.`` prefixes are removed.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise VitshrinkError(f"Checkpoint '{checkpoint}' does not exist or is not a file: check the path.")
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(checkpoint), device="cpu")
        except Exception as exc:
            raise VitshrinkError(
                f"'{checkpoint}' is not a readable safetensors file ({_one_line(exc)}): re-download it."
            ) from exc
    else:
        if not trust_pickle:
            raise VitshrinkError(
                f"'{checkpoint.name}' is a pickled checkpoint, which can run code when loaded: {_PICKLE_HINT}."
            )
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                obj = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VitshrinkError(
                f"Could not read '{checkpoint}' as a weights-only pickle ({_one_line(exc)}): "
                "check that it is a PyTorch checkpoint, not a truncated download."
            ) from exc
    state = _find_state_dict(obj)
    if state is None:
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise VitshrinkError(
            f"'{checkpoint.name}' holds no state dict of tensors (top level: {keys}): "
            "expected a dict with 'state_dict'."
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, dict):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model", "state_dict_ema", "model_ema", "module"):
        found = _find_state_dict(obj.get(key))
        if found is not None:
            return found
    return None


_VARIANT_ALIASES = {"s": "dualvit_s", "b": "dualvit_b", "l": "dualvit_l"}


def _normalise_variant(variant: str) -> tuple[str, str | None]:
    """'s' / 'dualvit-s' / 'dualvit_s' / 'dualvit_s.in1k_384' -> ('dualvit_s', tag or None)."""
    from vitshrink.models.dualvit import DUALVIT_VARIANTS

    name, _, tag = variant.strip().partition(".")
    key = name.lower().replace("-", "_")
    key = _VARIANT_ALIASES.get(key.removeprefix("dualvit_"), key)
    if key not in DUALVIT_VARIANTS:
        raise VitshrinkError(
            f"Unknown Dual-ViT variant '{variant}': use one of {', '.join(DUALVIT_VARIANTS)} "
            "(optionally with a tag such as .in1k_384), or leave it out to detect it from the weights."
        )
    if tag:
        import timm

        import vitshrink.models  # noqa: F401  (registers dualvit_*)

        known = [n for n in timm.list_models(f"{key}*", include_tags=True) if n.startswith(f"{key}.")]
        if f"{key}.{tag}" not in known:
            raise VitshrinkError(f"Unknown tag '{tag}' for {key}: use one of {', '.join(known)}.")
    return key, tag or None


def _model_kwargs(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Head options implied by the weights (class count, token-labelling head or not)."""
    kwargs: dict[str, Any] = {}
    head = state.get("head.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != 1000:
        kwargs["num_classes"] = int(head.shape[0])
    if "aux_head.weight" not in state:
        kwargs["use_aux_head"] = False
    return kwargs


def _expected_shapes(name: str, kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of a Dual-ViT variant (built on the meta device: no memory, no init)."""
    return dict(_expected_shapes_cached(name, tuple(sorted(kwargs.items()))))


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(
    name: str, kwargs: tuple[tuple[str, Any], ...]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import timm

    import vitshrink.models  # noqa: F401  (registers dualvit_*)

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **dict(kwargs))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _mismatch(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    return {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "shape": [
            f"{k} {tuple(state[k].shape)} vs {v}"
            for k, v in expected.items()
            if k in state and tuple(state[k].shape) != v
        ],
    }


def _describe(problems: dict[str, list[str]]) -> str:
    parts = []
    for kind, items in problems.items():
        if items:
            more = ", ..." if len(items) > 3 else ""
            parts.append(
                f"{len(items)} {kind}{' keys' if kind != 'shape' else ' mismatches'} ({', '.join(items[:3])}{more})"
            )
    return "; ".join(parts)


def detect_dualvit_variant(state: dict[str, torch.Tensor], variant: str | None = None) -> str:
    """The Dual-ViT variant (``dualvit_s|b|l``) whose keys and shapes match ``state``, or a clear error."""
    from vitshrink.models.dualvit import DUALVIT_VARIANTS

    kwargs = _model_kwargs(state)
    names = [_normalise_variant(variant)[0]] if variant else list(DUALVIT_VARIANTS)
    results: dict[str, dict[str, list[str]]] = {}
    for name in names:
        results[name] = _mismatch(state, _expected_shapes(name, kwargs))
        if not any(results[name].values()):
            return name
    if variant:
        name = names[0]
        raise VitshrinkError(
            f"The checkpoint does not match {name}: {_describe(results[name])}. "
            "Leave the variant out to detect it, or check the file."
        )
    best = min(results, key=lambda n: sum(len(v) for v in results[n].values()))
    problems = results[best]
    expected = len(_expected_shapes(best, kwargs))
    if len(problems["missing"]) * 2 > expected or "q_embed.0.weight" not in state:
        missing = problems["missing"]
        raise VitshrinkError(
            f"Not a Dual-ViT checkpoint: {len(missing)} of {expected} expected keys are missing "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}). Give an official Dual-ViT .pth.tar."
        )
    raise VitshrinkError(
        f"The checkpoint matches no Dual-ViT variant; closest is {best}: {_describe(problems)}. "
        "Check that it is an official Dual-ViT checkpoint."
    )


def convert_dualvit(
    checkpoint: Path,
    out_dir: Path,
    variant: str | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert an official Dual-ViT checkpoint into a timm Hub-layout folder; returns ``out_dir``.

    ``checkpoint``: the official ``.pth.tar`` (a pickle: read only with ``trust_pickle=True``, then
    with ``torch.load(weights_only=True)``) or a ``.safetensors`` state dict. ``variant``: ``s``, ``b``,
    ``l`` or ``dualvit_s`` ... (a tag such as ``dualvit_s.in1k_384`` selects the 384px preprocessing);
    detected from the weights when left out. The folder is written atomically and an existing
    ``out_dir`` is refused unless ``overwrite``.
    """
    import timm
    from timm.models import save_for_hf

    import vitshrink.models  # noqa: F401  (registers dualvit_*)
    from vitshrink.checkpoint import atomic_dir, check_output_dir

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite)
    tag = _normalise_variant(variant)[1] if variant else None
    state = read_checkpoint_state_dict(Path(checkpoint), trust_pickle=trust_pickle)
    name = detect_dualvit_variant(state, variant)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model: nn.Module = timm.create_model(
            f"{name}.{tag}" if tag else name, pretrained=False, **_model_kwargs(state)
        )
    model.load_state_dict(state, strict=True, assign=True)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_for_hf(model.eval(), str(tmp), safe_serialization=True)
    return out_dir
