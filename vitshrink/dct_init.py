"""The orthonormal DCT-II matrix and the DCT initialisation of attention (Pan et al., arXiv 2405.13901).

``dct_init_`` sets the Q (or K, V, or all three) block of an attention's fused ``qkv`` weight to the
orthonormal DCT-II matrix, as the paper does for training from scratch. Biases are left unchanged.
"""

from __future__ import annotations

import math

import torch
from timm.layers.attention import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from vitshrink.errors import VitshrinkError

__all__ = ["apply_dct_init", "dct_init_", "dct_matrix"]

_WHICH = ("q", "k", "v", "qkv")


def dct_matrix(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (n x n): ``D @ x`` are the DCT coefficients of ``x``, ``D @ D.T = I``.

    ``D[k, i] = s_k * cos(pi * (2 i + 1) * k / (2 n))`` with ``s_0 = sqrt(1 / n)``, ``s_k = sqrt(2 / n)``.
    """
    if n < 1:
        raise VitshrinkError(f"dct_matrix: size must be at least 1 (got {n}).")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    mat = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    mat[0] = math.sqrt(1.0 / n)
    return mat.to(dtype=dtype, device=device)


def _qkv_layout(attn: nn.Module) -> tuple[nn.Linear, int]:
    """The fused qkv Linear of a timm ``Attention`` / Swin ``WindowAttention`` and its block height."""
    if not isinstance(attn, (Attention, WindowAttention)) or not isinstance(
        getattr(attn, "qkv", None), nn.Linear
    ):
        raise VitshrinkError(
            f"dct_init_: {type(attn).__name__} is not a timm Attention or Swin WindowAttention with a fused qkv."
        )
    qkv: nn.Linear = attn.qkv
    if qkv.out_features % 3:
        raise VitshrinkError(f"dct_init_: qkv has {qkv.out_features} outputs, not three equal q/k/v blocks.")
    return qkv, qkv.out_features // 3


def dct_init_(attn: nn.Module, which: str = "q") -> nn.Module:
    """Set the ``which`` block(s) of ``attn.qkv.weight`` to the orthonormal DCT-II matrix, in place.

    ``which`` is 'q', 'k', 'v' or 'qkv'. Each block is (A x C_in); it becomes ``dct_matrix(C_in)`` when
    square and its first A rows (the lowest A frequencies) when A < C_in. Returns ``attn``.
    """
    if which not in _WHICH:
        raise VitshrinkError(f"dct_init_: which='{which}' is not one of {', '.join(_WHICH)}.")
    qkv, rows = _qkv_layout(attn)
    cols = qkv.in_features
    if rows > cols:
        raise VitshrinkError(
            f"dct_init_: the q/k/v blocks are {rows} x {cols}; the DCT init needs at most as many rows as inputs."
        )
    mat = dct_matrix(cols, dtype=qkv.weight.dtype, device=qkv.weight.device)[:rows]
    blocks = range(3) if which == "qkv" else ("qkv".index(which),)
    with torch.no_grad():
        for j in blocks:
            qkv.weight[j * rows : (j + 1) * rows].copy_(mat)
    return attn


def apply_dct_init(model: nn.Module, which: str = "q") -> int:
    """``dct_init_`` on every timm Attention / Swin WindowAttention of ``model``; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, (Attention, WindowAttention)):
            dct_init_(module, which)
            count += 1
    if not count:
        raise VitshrinkError(
            f"apply_dct_init: {type(model).__name__} has no timm Attention or Swin WindowAttention to initialise."
        )
    return count
