"""Compression methods. Every module in this package registers its method on import."""

from __future__ import annotations

import importlib
import pkgutil

from vitshrink.methods.base import (
    METHODS,
    CalibrationContext,
    Method,
    get_method,
    parse_method_string,
    register_method,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "CalibrationContext",
    "Method",
    "get_method",
    "parse_method_string",
    "register_method",
]
