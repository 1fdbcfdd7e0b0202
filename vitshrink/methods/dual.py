"""dual: Dual-ViT-style dual-pathway attention in chosen blocks of a pretrained ViT/DeiT.

After Yao et al., "Dual Vision Transformer" (arXiv 2207.04976), rewritten for a pretrained plain ViT
with no new projection weights. In each chosen block the attention input's patch tokens (a G x G
grid) are average-pooled to an S x S grid of ``M = S*S`` *semantic tokens*. Because the block's
``qkv`` projection is affine, pooling its output equals projecting the pooled tokens, so the semantic
tokens' q/k/v cost one pooling of the patch q/k/v. Then:

* semantic pathway: semantic queries attend to ``[prefix tokens, semantic tokens]`` (self-attention
  among the semantic tokens plus the class token); the result moves the semantic values towards
  this context by a learned per-head gate (``gate=true``, zero-initialised, so the rewritten block
  starts as plain pooled attention) or replaces them (``gate=false``, no new parameters);
* pixel pathway: each patch query attends only to ``[prefix tokens, semantic tokens]``: cost
  ``O(N*M)`` instead of ``O(N^2)``;
* prefix tokens (class, distillation, registers) still attend to all tokens, exactly as before (an
  ``O(N)`` cost): the class token feeds the classifier, so it keeps its exact view.

Each semantic key carries a ``log(tokens it stands for)`` bias, so a region of k similar patches
weighs like those k patches did (exact when they are equal). The block's ``qkv``, ``q_norm``,
``k_norm``, ``norm``, ``proj`` modules move into :class:`DualPathAttention` under the same names:
state-dict keys stay ``blocks.i.attn.qkv.weight`` ...; ``gate=true`` adds ``blocks.i.attn.sem_gate``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn

from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import CalibrationContext, Method, parse_layers, register_method, vit_blocks

POOLS = ("avg",)


def _pool_windows(n: int, m: int) -> list[int]:
    """Window lengths of PyTorch's adaptive pooling from n cells to m."""
    return [-((-(i + 1) * n) // m) - (i * n) // m for i in range(m)]


def semantic_log_mass(grid: tuple[int, int], side: int) -> torch.Tensor:
    """(side*side,) log of the patch tokens each pooled cell stands for (cells sum to the grid's tokens)."""
    rows, cols = _pool_windows(grid[0], side), _pool_windows(grid[1], side)
    area = torch.tensor([float(r * c) for r in rows for c in cols], dtype=torch.float64)
    return (area * (grid[0] * grid[1]) / area.sum()).log().float()


def _submodule(attn: nn.Module, name: str, default: type[nn.Module]) -> nn.Module:
    mod = getattr(attn, name, None)
    return mod if mod is not None else default()


class DualPathAttention(nn.Module):
    """Drop-in for timm's ``Attention``: prefix tokens attend to all, patch tokens to prefix + semantic."""

    def __init__(
        self,
        attn: nn.Module,
        num_prefix_tokens: int,
        grid: tuple[int, int],
        tokens: int,
        gate: bool = True,
    ) -> None:
        super().__init__()
        side = math.isqrt(tokens)
        if side * side != tokens or not 0 < side < min(grid):
            raise VitshrinkError(
                f"dual tokens={tokens} cannot be pooled from a {grid[0]}x{grid[1]} grid: use a square number "
                f"whose side is below {min(grid)}."
            )
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(getattr(attn, "head_dim", 0) or attn.qkv.out_features // 3 // self.num_heads)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = float(attn.scale)
        self.fused_attn = bool(getattr(attn, "fused_attn", True))
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid = (int(grid[0]), int(grid[1]))
        self.side = side
        self.tokens = tokens
        # the pretrained modules, under their original names (state-dict keys unchanged)
        self.qkv = attn.qkv
        self.q_norm = _submodule(attn, "q_norm", nn.Identity)
        self.k_norm = _submodule(attn, "k_norm", nn.Identity)
        self.attn_drop = _submodule(attn, "attn_drop", nn.Dropout)
        self.norm = _submodule(attn, "norm", nn.Identity)
        self.gate = getattr(attn, "gate", None)
        self.proj = attn.proj
        self.proj_drop = _submodule(attn, "proj_drop", nn.Dropout)
        ref = next(attn.parameters())
        self.sem_gate = (
            nn.Parameter(torch.zeros(self.num_heads, 1, 1, device=ref.device, dtype=ref.dtype))
            if gate
            else None
        )
        bias = torch.cat([torch.zeros(self.num_prefix_tokens), semantic_log_mass(self.grid, side)])
        self.register_buffer(
            "key_bias", bias.to(device=ref.device, dtype=ref.dtype).view(1, 1, 1, -1), persistent=False
        )

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        p = self.attn_drop.p if self.training else 0.0
        if self.fused_attn:
            mask = None if bias is None else bias.to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias.to(attn.dtype)
        return self.attn_drop(attn.softmax(dim=-1)) @ v

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitshrinkError(
                "dual attention does not support attention masks (it pools the patch tokens)."
            )
        b, t, _ = x.shape
        p, (gh, gw) = self.num_prefix_tokens, self.grid
        if t != p + gh * gw:
            raise VitshrinkError(
                f"dual block expects {p + gh * gw} tokens ({p} prefix + {gh}x{gw} patches) but got {t}: "
                "use the input size the model was compressed at."
            )
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)  # (B, T, 3A)
        c3 = qkv.shape[-1]
        # semantic tokens: pooled q/k/v of the patch tokens (== q/k/v of the pooled tokens; qkv is affine)
        patches = qkv[:, p:].transpose(1, 2).reshape(b, c3, gh, gw)
        sem = F.adaptive_avg_pool2d(patches, self.side).flatten(2).transpose(1, 2)  # (B, M, 3A)
        h, d = self.num_heads, self.head_dim
        q, k, v = qkv.reshape(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        qs, ks, vs = sem.reshape(b, self.tokens, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        qs, ks = self.q_norm(qs), self.k_norm(ks)
        keys = torch.cat([k[:, :, :p], ks], dim=2)
        bias = self.key_bias
        # semantic pathway: semantic tokens attend to [prefix, semantic]
        sem_out = self._attend(qs, keys, torch.cat([v[:, :, :p], vs], dim=2), bias)
        vs = vs + self.sem_gate * (sem_out - vs) if self.sem_gate is not None else sem_out
        values = torch.cat([v[:, :, :p], vs], dim=2)
        # pixel pathway: patch queries attend to [prefix, semantic] only
        out = self._attend(q[:, :, p:], keys, values, bias)
        if p:  # prefix tokens keep full attention
            out = torch.cat([self._attend(q[:, :, :p], k, v, None), out], dim=2)
        out = self.norm(out.transpose(1, 2).reshape(b, t, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, prefix={self.num_prefix_tokens}, grid={self.grid[0]}x{self.grid[1]}, "
            f"semantic={self.side}x{self.side}, gate={self.sem_gate is not None}"
        )


def _patch_grid(model: nn.Module) -> tuple[int, int]:
    """The model's patch grid, or a clear error when it is missing, dynamic or not square."""
    patch_embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_pad", False):
        raise VitshrinkError(
            "dual needs a fixed token grid; this model has dynamic_img_size: create it without it."
        )
    grid = getattr(patch_embed, "grid_size", None)
    if grid is None or len(grid) != 2:
        raise VitshrinkError(f"{type(model).__name__} has no fixed patch grid: dual needs a ViT/DeiT.")
    gh, gw = int(grid[0]), int(grid[1])
    if gh != gw:
        raise VitshrinkError(
            f"dual needs a square patch grid but this model's is {gh}x{gw}: use a square input "
            "(e.g. img_size 224 -> 14x14 patches)."
        )
    return gh, gw


def _find_attention(block: nn.Module, index: int) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute name, attention module) of a block's self-attention."""
    found = [
        (name, mod)
        for name, mod in block.named_modules()
        if isinstance(mod, (TimmAttention, DualPathAttention)) or name.split(".")[-1] == "attn"
    ]
    if not found:
        raise VitshrinkError(
            f"dual: block {index} ({type(block).__name__}) has no attention module to rewrite."
        )
    name, attn = found[0]
    if isinstance(attn, DualPathAttention):
        raise VitshrinkError(f"dual: block {index} already uses dual attention; apply dual once per block.")
    if type(attn) is not TimmAttention:
        raise VitshrinkError(
            f"dual: block {index}'s attention is {type(attn).__name__}, not timm's Attention (another method "
            "rewrote it): choose other layers for dual."
        )
    parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
    return parent, name.rsplit(".", 1)[-1], attn


@torch.no_grad()
def _attention_token_counts(model: nn.Module, attns: dict[int, nn.Module]) -> dict[int, int]:
    """Tokens reaching each given attention module, from one forward pass on a blank image."""
    counts: dict[int, int] = {}
    hooks = [
        attn.register_forward_pre_hook(lambda _m, args, i=i: counts.__setitem__(i, int(args[0].shape[1])))
        for i, attn in attns.items()
    ]
    patch_embed = model.patch_embed
    size = tuple(int(s) for s in patch_embed.img_size)
    proj = getattr(patch_embed, "proj", None)
    chans = int(getattr(proj, "in_channels", 3))
    ref = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, chans, *size, device=ref.device, dtype=ref.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return counts


def _as_bool(value: Any, knob: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise VitshrinkError(f"dual {knob}='{value}' is not a yes/no value: use true or false.")


def _resolve_tokens(value: Any, side: int) -> int:
    if value is None or value == "auto":
        s = min(7, side // 2)
        if s < 1:
            raise VitshrinkError(f"dual needs a patch grid of at least 2x2; this model's is {side}x{side}.")
        return s * s
    try:
        tokens = int(value)
        if float(value) != tokens:
            raise ValueError
    except (TypeError, ValueError):
        raise VitshrinkError(
            f"dual tokens='{value}' is not a whole number: give a square such as 49 or 16."
        ) from None
    s = math.isqrt(tokens) if tokens > 0 else 0
    if tokens < 1 or s * s != tokens:
        raise VitshrinkError(
            f"dual tokens={tokens} is not a square number: the semantic tokens form an S x S grid, "
            "e.g. 49 (7x7) or 16 (4x4)."
        )
    if s >= side:
        raise VitshrinkError(
            f"dual tokens={tokens} ({s}x{s}) must be fewer than the {side}x{side} patch grid: "
            f"pick a square with side below {side}, e.g. {max(1, side // 2) ** 2}."
        )
    return tokens


@register_method
class Dual(Method):
    """Dual-pathway attention (semantic + pixel) in later blocks, reusing the pretrained weights."""

    name = "dual"
    defaults = {"layers": "auto", "tokens": "auto", "pool": "avg", "gate": True}
    help = {
        "layers": "blocks to rewrite ('auto': the last half of the blocks), e.g. '6-11'",
        "tokens": "semantic tokens M, a square (S x S pooled grid, S below the patch grid side); "
        "'auto': 49 (7x7) for grids of 14x14 or more, else (side/2)^2",
        "pool": "how patch tokens become semantic tokens: 'avg' (adaptive average pooling)",
        "gate": "learn a zero-initialised per-head gate for the semantic self-attention update "
        "(false: no new parameters, the update is applied fully)",
    }

    def check(self, model: nn.Module) -> None:
        blocks = vit_blocks(model)
        _patch_grid(model)
        if not any(isinstance(m, TimmAttention) for m in blocks.modules()):
            raise VitshrinkError(
                f"{type(model).__name__} has no timm Attention in its blocks: dual needs a ViT/DeiT."
            )

    def resolve(self, model: nn.Module, knobs: dict[str, Any], analysis: Any | None) -> dict[str, Any]:
        self.check(model)
        unknown = sorted(set(knobs) - set(self.defaults))
        if unknown:
            raise VitshrinkError(f"dual has no knob '{unknown[0]}'; knobs: {', '.join(self.defaults)}.")
        p = {**self.defaults, **knobs}
        depth = len(vit_blocks(model))
        layers = parse_layers(p["layers"], depth, "dual layers")
        if layers == "auto":
            layers = list(range(depth // 2, depth))
        if not layers:
            raise VitshrinkError("dual layers is empty: give at least one block index, or 'auto'.")
        pool = str(p["pool"])
        if pool not in POOLS:
            raise VitshrinkError(f"dual pool='{pool}' is unknown: use one of {', '.join(POOLS)}.")
        side = _patch_grid(model)[0]
        return {
            "layers": [int(i) for i in layers],
            "tokens": _resolve_tokens(p["tokens"], side),
            "pool": pool,
            "gate": _as_bool(p["gate"], "gate"),
        }

    def apply(self, model: nn.Module, params: dict[str, Any], ctx: CalibrationContext | None) -> None:
        """Swap the chosen blocks' attention for :class:`DualPathAttention` (nothing to calibrate)."""
        self.check(model)
        blocks = vit_blocks(model)
        layers = parse_layers(params.get("layers"), len(blocks), "dual layers")
        if not isinstance(layers, list) or not layers:
            raise VitshrinkError("dual params need a concrete, non-empty 'layers' list (resolve them first).")
        if params.get("pool", "avg") not in POOLS:
            raise VitshrinkError(
                f"dual pool='{params.get('pool')}' is unknown: use one of {', '.join(POOLS)}."
            )
        tokens = int(params["tokens"])
        gate = _as_bool(params.get("gate", True), "gate")
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        found = {i: _find_attention(blocks[i], i) for i in layers}
        counts = _attention_token_counts(model, {i: attn for i, (_, _, attn) in found.items()})
        for i, (parent, attr, attn) in found.items():
            n = counts.get(i, 0) - prefix
            side = math.isqrt(max(n, 0))
            if n < 1 or side * side != n:
                raise VitshrinkError(
                    f"dual: block {i} sees {n} patch tokens, not a square grid (an earlier method changed "
                    "them): choose other layers for dual."
                )
            _resolve_tokens(tokens, side)
            setattr(parent, attr, DualPathAttention(attn, prefix, (side, side), tokens, gate=gate))

    def distill_layers(self, params: dict[str, Any]) -> list[int]:
        """The rewritten blocks: their outputs keep the teacher's shape."""
        return [int(i) for i in params.get("layers", [])]
