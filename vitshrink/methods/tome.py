"""Token merging (ToMe), reimplemented as a comparison baseline.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023. In every block, between the attention
and the MLP, ``r`` patch tokens are merged into others by *bipartite soft matching*:

1. the patch tokens are split alternately into sets A (even positions) and B (odd positions);
2. similarity = cosine of the attention keys averaged over heads;
3. every A token picks its most similar B token; the ``r`` most similar (A -> B) edges are merged;
4. a merge is a size-weighted average, and the token sizes (how many patches a token stands for) are
   tracked; with proportional attention ``log(size)`` is added to the attention logits of each key.

Prefix tokens (class, distillation, register tokens) never take part in matching. The patch is made
in place by swapping each timm ``Block`` / ``Attention`` to the ToMe-aware subclasses below, so the
model keeps its parameters and state-dict keys: ToMe adds no weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import CalibrationContext, Method, register_method, vit_blocks

__all__ = [
    "ToMe",
    "ToMeAttention",
    "ToMeBlock",
    "ToMeState",
    "bipartite_soft_matching",
    "merge_wavg",
    "tome_schedule",
]

Merge = Callable[[torch.Tensor], torch.Tensor]


class ToMeState:
    """Per-forward token sizes shared by the blocks of one model (a plain object: not in state_dict).

    Block ``i`` reads the sizes written by block ``i - 1`` and writes its own, so a recomputation of a
    single block (activation checkpointing) sees the same sizes as the forward pass did.
    """

    def __init__(self, depth: int) -> None:
        self.sizes: list[torch.Tensor | None] = [None] * depth


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Merge:
    """Match ``r`` tokens of set A to their most similar tokens of set B; return the merge function.

    ``metric`` is (B, N, c) (mean attention keys); the first ``num_prefix`` tokens are left alone. The
    returned ``merge(x, mode)`` maps (B, N, C) to (B, N - r, C) as ``[prefix, unmerged A, B]`` where
    the merged A tokens are reduced into their B partners with ``mode`` ("sum" or "mean").
    """
    with torch.no_grad():
        m = metric[:, num_prefix:]
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        best, best_idx = scores.max(dim=-1)  # best B partner of each A token
        order = best.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
        unm_idx = order[:, r:]  # A tokens that stay
        src_idx = order[:, :r]  # A tokens that are merged away
        dst_idx = best_idx[..., None].gather(1, src_idx)  # their B partners

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        prefix, rest = x[:, :num_prefix], x[:, num_prefix:]
        src, dst = rest[:, ::2], rest[:, 1::2]
        c = x.shape[-1]
        unm = src.gather(1, unm_idx.expand(-1, -1, c))
        moved = src.gather(1, src_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), moved, reduce=mode)
        return torch.cat([prefix, unm, dst], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x`` (B, N, C); returns the merged tokens and their sizes."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


class ToMeAttention(Attention):
    """timm ``Attention`` that adds ``log(size)`` to the logits and also returns the mean keys."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else size.log()[:, None, None, :, 0]  # (B, 1, 1, N)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, k.mean(dim=1)


class ToMeBlock(Block):
    """timm ``Block`` that merges ``_tome_r`` tokens between attention and MLP."""

    _tome_r: int
    _tome_prop_attn: bool
    _tome_index: int
    _tome_prefix: int
    _tome_state: ToMeState

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitshrinkError("tome does not support attention masks: call the model without attn_mask.")
        state, i = self._tome_state, self._tome_index
        size = state.sizes[i - 1] if i > 0 else None
        x_attn, metric = self.attn(self.norm1(x), size if self._tome_prop_attn else None)
        x = x + self.drop_path1(self.ls1(x_attn))
        # Cap like ToMe at run time (e.g. a smaller input than the one the schedule was made for).
        r = min(self._tome_r, (x.shape[1] - self._tome_prefix) // 2)
        if r > 0:
            merge = bipartite_soft_matching(metric, r, self._tome_prefix)
            x, size = merge_wavg(merge, x, size)
        state.sizes[i] = size
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _token_counts(model: nn.Module) -> tuple[int, int]:
    """(patch tokens, prefix tokens) at the model's configured input size."""
    patch_embed = model.patch_embed
    n = getattr(patch_embed, "num_patches", None)
    if n is None:
        raise VitshrinkError("tome: cannot tell the number of patch tokens (patch_embed has no num_patches).")
    return int(n), int(getattr(model, "num_prefix_tokens", 1))


def tome_schedule(r: Any, num_patches: int, depth: int) -> list[int]:
    """Per-block merge counts from ``r``: an int (same every block), a fraction in (0, 1) of the
    current patch-token count of each block, or a list with one int per block. Raises if tokens run out.
    """
    if isinstance(r, bool):
        raise VitshrinkError(
            f"tome: r={r!r} is not a number: give an int such as 8 or a fraction such as 0.1."
        )
    if isinstance(r, str):
        try:
            r = float(r) if any(ch in r for ch in ".eE") else int(r)
        except ValueError:
            raise VitshrinkError(
                f"tome: r='{r}' is not a number: give an int such as 8, a fraction such as 0.1, or 'auto'."
            ) from None
    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise VitshrinkError(
                f"tome: r has {len(r)} entries but the model has {depth} blocks: give one per block."
            )
        try:
            sched = [int(v) for v in r]
        except (TypeError, ValueError):
            raise VitshrinkError(f"tome: r={list(r)} must be a list of ints, one per block.") from None
    elif isinstance(r, float) and not r.is_integer():
        if not 0.0 < r < 1.0:
            raise VitshrinkError(
                f"tome: r={r} as a fraction must be between 0 and 1 (e.g. 0.1), or give an int."
            )
        sched, n = [], num_patches
        for _ in range(depth):
            step = int(math.floor(r * n))
            sched.append(step)
            n -= step
    elif isinstance(r, (int, float)):
        sched = [int(r)] * depth
    else:
        raise VitshrinkError(
            f"tome: r={r!r} is not understood: give an int such as 8 or a fraction such as 0.1."
        )
    if any(v < 0 for v in sched):
        raise VitshrinkError(f"tome: r must not be negative (got {r}).")
    n = num_patches
    for i, step in enumerate(sched):
        if step > n // 2:
            max_r = max(0, num_patches // (depth + 1))
            raise VitshrinkError(
                f"tome: r={r} merges too many tokens: block {i} would have {n} patch tokens left, so at most "
                f"{n // 2} can merge there. Use r <= {max_r} for this model ({num_patches} patch tokens, "
                f"{depth} blocks), or a fraction such as 0.1."
            )
        n -= step
    return sched


def _check_blocks(model: nn.Module) -> nn.Sequential:
    blocks = vit_blocks(model)
    for i, blk in enumerate(blocks):
        if type(blk) is ToMeBlock:
            raise VitshrinkError("tome is already applied to this model: apply it once.")
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise VitshrinkError(
                f"tome: block {i} is a {type(blk).__name__} with {type(blk.attn).__name__}; tome supports plain "
                "timm ViT/DeiT blocks (Block + Attention) only: apply it before methods that rewrite attention."
            )
    return blocks


@register_method
class ToMe(Method):
    """Token merging baseline (Bolya et al., ICLR 2023), no new weights."""

    name = "tome"
    defaults = {"r": "auto", "prop_attn": True}
    help = {
        "r": "tokens merged per block: int, fraction of the block's tokens (e.g. 0.1), list per block, "
        "or auto (8 for a 14x14 grid, scaled to the grid size)",
        "prop_attn": "proportional attention: add log(token size) to the attention logits (default true)",
    }

    def check(self, model: nn.Module) -> None:
        _check_blocks(model)
        _token_counts(model)

    def resolve(self, model: nn.Module, knobs: dict[str, Any], analysis: Any | None) -> dict[str, Any]:
        self.check(model)
        params = {**self.defaults, **knobs}
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise VitshrinkError(f"tome: unknown knob(s) {', '.join(sorted(unknown))}; known: r, prop_attn.")
        depth = len(vit_blocks(model))
        num_patches, _ = _token_counts(model)
        r = params["r"]
        if r is None or r == "auto":
            r = max(1, min(round(num_patches * 8 / 196), num_patches // (depth + 1)))
        tome_schedule(r, num_patches, depth)  # validates
        if isinstance(r, (list, tuple)):
            r = [int(v) for v in r]
        elif isinstance(r, str):
            r = float(r) if any(ch in r for ch in ".eE") else int(r)
        if isinstance(r, float) and r.is_integer():
            r = int(r)
        return {"r": r, "prop_attn": _as_bool(params["prop_attn"])}

    def apply(self, model: nn.Module, params: dict[str, Any], ctx: CalibrationContext | None) -> None:
        blocks = _check_blocks(model)
        num_patches, num_prefix = _token_counts(model)
        sched = tome_schedule(params.get("r", 0), num_patches, len(blocks))
        prop_attn = _as_bool(params.get("prop_attn", True))
        state = ToMeState(len(blocks))
        for i, blk in enumerate(blocks):
            blk.__class__ = ToMeBlock
            blk.attn.__class__ = ToMeAttention
            blk._tome_r = sched[i]
            blk._tome_prop_attn = prop_attn
            blk._tome_index = i
            blk._tome_prefix = num_prefix
            blk._tome_state = state
        model._tome_state = state

    def distill_layers(self, params: dict[str, Any]) -> list[int]:
        # Merged blocks have fewer tokens than the teacher's: only the logits can be matched.
        return []


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
        return value.lower() in {"true", "1", "yes", "on"}
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise VitshrinkError(f"tome: prop_attn={value!r} must be true or false.")
