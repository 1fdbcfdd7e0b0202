"""The contract every compression method follows, and the method registry.

A method is a small module that rewrites a timm model in place (in the spirit of ToMe's patch).
It has two modes:

* ``apply(model, params, ctx)`` with a :class:`CalibrationContext`: rewrite *and* initialise the new
  parts from calibration data (used by ``vitshrink compress``);
* ``apply(model, params, None)``: rewrite the structure only, so that a saved ``model.safetensors``
  can be loaded into it (used by ``vitshrink.load`` on a compressed folder).

``resolve`` turns user knobs (which may say ``"auto"``) into concrete, JSON-serialisable parameters
that are stored in the output's ``config.json`` and are enough to rebuild the structure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vitshrink.errors import VitshrinkError


@dataclass
class CalibrationContext:
    """What a method may use to initialise itself."""

    images: torch.Tensor
    """Preprocessed calibration images, shape (n, C, H, W), already on the model's device."""
    analysis: Any | None = None
    """Per-layer attention statistics (:class:`vitshrink.analysis.AttentionAnalysis`) or None."""
    batch_size: int = 32
    extras: dict[str, Any] = field(default_factory=dict)

    def batches(self) -> Iterable[torch.Tensor]:
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start : start + self.batch_size]


class Method:
    """Base class: subclass, set ``name`` and ``defaults``, implement ``resolve`` and ``apply``."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    help: ClassVar[dict[str, str]] = {}
    """One line per knob, shown by ``vitshrink methods`` and in docs."""

    def check(self, model: nn.Module) -> None:
        """Raise :class:`VitshrinkError` if this method cannot be applied to ``model``."""

    def resolve(
        self, model: nn.Module, knobs: dict[str, Any], analysis: Any | None
    ) -> dict[str, Any]:
        """Concrete parameters from user knobs (merged over ``defaults``), using analysis for 'auto'."""
        return {**self.defaults, **knobs}

    def apply(self, model: nn.Module, params: dict[str, Any], ctx: CalibrationContext | None) -> None:
        """Rewrite ``model`` in place. Initialise new weights from ``ctx`` when it is given."""
        raise NotImplementedError

    def distill_layers(self, params: dict[str, Any]) -> list[int]:
        """Block indices whose outputs the fine-tune should match to the original model's (MSE)."""
        return []


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator that adds a method to :data:`METHODS` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    import difflib

    from vitshrink import methods as _methods  # noqa: F401  (imports register the methods)

    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise VitshrinkError(
            f"Unknown method '{name}'. Available: {', '.join(sorted(METHODS))}.{hint}"
        )
    return METHODS[name]()


def parse_method_string(spec: str) -> list[str]:
    """'dgssa+glad' -> ['dgssa', 'glad'], each checked against the registry."""
    names = [part.strip() for part in spec.split("+") if part.strip()]
    if not names:
        raise VitshrinkError("--method is empty: give one or more methods joined by '+', e.g. dgssa+glad.")
    for name in names:
        get_method(name)
    if len(set(names)) != len(names):
        raise VitshrinkError(f"--method '{spec}' names a method twice.")
    return names


def vit_blocks(model: nn.Module) -> nn.Sequential:
    """The transformer blocks of a timm VisionTransformer-like model, or a clear error."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "patch_embed"):
        raise VitshrinkError(
            f"{type(model).__name__} is not a plain ViT/DeiT (no 'blocks' sequence): "
            "this method needs a timm VisionTransformer."
        )
    return blocks


def parse_layers(value: Any, depth: int, knob: str) -> list[int] | str:
    """'auto' stays 'auto'; '0,1,2' or '0-3' or [0, 1] become a sorted list of valid block indices."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, int):
        items: list[int] = [value]
    elif isinstance(value, (list, tuple)):
        items = [int(v) for v in value]
    else:
        items = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = part.split("-", 1)
                    items.extend(range(int(lo), int(hi) + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise VitshrinkError(
                    f"{knob}='{value}' is not a list of block indices: use e.g. '0,1,2', '0-3' or 'auto'."
                ) from None
    bad = [i for i in items if not 0 <= i < depth]
    if bad:
        raise VitshrinkError(
            f"{knob}: block index {bad[0]} is out of range; this model has blocks 0-{depth - 1}."
        )
    return sorted(set(items))


Callback = Callable[[str], None]
