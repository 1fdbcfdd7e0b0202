"""vitshrink: make pretrained Vision Transformers faster after training."""

from __future__ import annotations

__version__ = "0.1.0"

from vitshrink.errors import VitshrinkError  # noqa: E402
from vitshrink.sources import load, load_model  # noqa: E402

__all__ = ["VitshrinkError", "__version__", "load", "load_model"]
