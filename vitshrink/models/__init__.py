"""Model families registered with timm. Importing this package registers them.

* :mod:`vitshrink.models.dualvit`: Dual-ViT (``dualvit_s``, ``dualvit_b``, ``dualvit_l``).
"""

from __future__ import annotations

from vitshrink.models import dualvit
from vitshrink.models.dualvit import DualViT

__all__ = ["DualViT", "dualvit"]
