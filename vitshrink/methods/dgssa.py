"""DGSSA: dynamic-guided static self-attention (our design after the abstract of Yu et al.,
arXiv 2310.07664).

In early blocks whose attention maps are nearly the same for every image, the attention becomes a
learned static matrix per head (heads x N x N over all tokens, prefix tokens included). Q and K
projections disappear: the block's ``attn`` becomes :class:`StaticAttention` with only ``v`` (V's
slice of the old ``qkv``), the static matrix and ``proj``. Inference is ``static_attn @ v`` for all
heads in one batched matmul; there is no softmax. The matrix starts as the layer's mean dynamic
attention over the calibration images and is trained by the fine-tune to reproduce the original
block's output (:meth:`Dgssa.distill_layers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitshrink.analysis import mean_attention, unwrap_block, vit_attention_blocks
from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import CalibrationContext, Method, parse_layers, register_method, vit_blocks
from vitshrink.methods.glad import base_num_patches, block_token_counts


class StaticAttention(nn.Module):
    """Self-attention with a fixed (learned) attention matrix per head: ``proj(static_attn @ v(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        num_tokens: int,
        v_bias: bool = True,
        norm: nn.Module | None = None,
        gate: nn.Module | None = None,
        proj: nn.Module | None = None,
        proj_drop: nn.Module | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.num_tokens = num_tokens
        self.v = nn.Linear(dim, self.attn_dim, bias=v_bias, device=device, dtype=dtype)
        self.static_attn = nn.Parameter(
            torch.full((num_heads, num_tokens, num_tokens), 1.0 / num_tokens, device=device, dtype=dtype)
        )
        self.norm = norm if norm is not None else nn.Identity()
        self.gate = gate
        self.proj = proj if proj is not None else nn.Linear(self.attn_dim, dim, device=device, dtype=dtype)
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    @classmethod
    def from_attention(cls, attn: nn.Module, num_tokens: int) -> StaticAttention:
        """Build from a timm ``Attention``: V's slice of ``qkv``; ``proj``, ``norm``, ``gate`` reused."""
        qkv: nn.Linear = attn.qkv
        new = cls(
            dim=qkv.in_features,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            num_tokens=num_tokens,
            v_bias=qkv.bias is not None,
            norm=attn.norm,
            gate=getattr(attn, "gate", None),
            proj=attn.proj,
            proj_drop=attn.proj_drop,
            device=qkv.weight.device,
            dtype=qkv.weight.dtype,
        )
        d = new.attn_dim
        with torch.no_grad():
            new.v.weight.copy_(qkv.weight[2 * d : 3 * d])
            if qkv.bias is not None:
                new.v.bias.copy_(qkv.bias[2 * d : 3 * d])
        return new

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        batch, tokens, _ = x.shape
        if tokens != self.num_tokens:
            raise VitshrinkError(
                f"DGSSA static attention was built for {self.num_tokens} tokens but got {tokens}: the "
                "compressed model is bound to the input size it was built for; resize the input to it."
            )
        if attn_mask is not None or is_causal:
            raise VitshrinkError("DGSSA static attention does not support attention masks.")
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        v = self.v(x).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        out = torch.matmul(self.static_attn, v)  # (H, N, N) x (B, H, N, d) -> (B, H, N, d)
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_tokens={self.num_tokens}"


def fallback_layers(depth: int) -> list[int]:
    """Default without analysis: the first quarter of the blocks (at least one)."""
    return list(range(max(1, depth // 4)))


def _analysis_means(
    analysis: Any, layers: list[int], shapes: dict[int, tuple[int, int, int]]
) -> dict[int, torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    stats = getattr(analysis, "layers", None) or []
    for i in layers:
        if i < len(stats):
            mean = getattr(stats[i], "mean_attention", None)
            if isinstance(mean, torch.Tensor) and tuple(mean.shape) == shapes[i]:
                found[i] = mean
    return found


@register_method
class Dgssa(Method):
    """Dynamic-guided static self-attention for early blocks with image-independent attention."""

    name = "dgssa"
    defaults = {"layers": "auto", "similarity": 0.8}
    help = {
        "layers": "blocks whose attention becomes static ('auto': from analysis, else the first quarter)",
        "similarity": "'auto' picks early blocks whose attention similarity across images is at least this",
    }

    def check(self, model: nn.Module) -> None:
        vit_attention_blocks(model, "dgssa", [])  # ViT/DeiT (the chosen blocks are checked later)
        base_num_patches(model)

    def resolve(self, model: nn.Module, knobs: dict[str, Any], analysis: Any | None) -> dict[str, Any]:
        self.check(model)
        unknown = sorted(set(knobs) - set(self.defaults))
        if unknown:
            raise VitshrinkError(f"dgssa has no knob '{unknown[0]}'; knobs: {', '.join(self.defaults)}.")
        p = {**self.defaults, **knobs}
        try:
            threshold = float(p["similarity"])
        except (TypeError, ValueError):
            raise VitshrinkError(
                f"dgssa similarity='{p['similarity']}' must be a number in [0, 1]."
            ) from None
        blocks = vit_blocks(model)
        depth = len(blocks)
        layers = parse_layers(p["layers"], depth, "dgssa layers")
        if layers == "auto":
            suggested: list[int] = []
            if analysis is not None and getattr(analysis, "depth", None) == depth:
                suggested = analysis.suggest_layers(similarity_threshold=threshold)["dgssa"]
            layers = suggested or fallback_layers(depth)
        assert isinstance(layers, list)
        if not layers:
            raise VitshrinkError("dgssa layers is empty: give at least one block index.")
        attns = vit_attention_blocks(model, "dgssa", layers)
        counts = block_token_counts(model)
        return {
            "layers": [int(i) for i in layers],
            "num_tokens": int(getattr(model, "num_prefix_tokens", 0)) + base_num_patches(model),
            "num_heads": int(attns[layers[0]].num_heads),
            "layer_tokens": [counts[i] for i in layers],
        }

    def apply(self, model: nn.Module, params: dict[str, Any], ctx: CalibrationContext | None) -> None:
        self.check(model)
        blocks = vit_blocks(model)
        layers = [int(i) for i in params["layers"]]
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise VitshrinkError(
                f"dgssa layers: block index {bad[0]} is out of range; this model has blocks 0-{len(blocks) - 1}."
            )
        expected = int(getattr(model, "num_prefix_tokens", 0)) + base_num_patches(model)
        if int(params.get("num_tokens", expected)) != expected:
            raise VitshrinkError(
                f"dgssa was built for {params['num_tokens']} tokens but this model makes {expected}: "
                "create the model with the input size it was compressed at."
            )
        counts = block_token_counts(model)
        layer_tokens = params.get("layer_tokens")
        if layer_tokens is not None and [int(n) for n in layer_tokens] != [counts[i] for i in layers]:
            raise VitshrinkError(
                f"dgssa was built for {list(layer_tokens)} tokens at blocks {layers} but they now receive "
                f"{[counts[i] for i in layers]}: apply the methods in the order they were compressed with."
            )
        attns = vit_attention_blocks(model, "dgssa", layers)
        for i in layers:
            if attns[i].num_heads != int(params.get("num_heads", attns[i].num_heads)):
                raise VitshrinkError(
                    f"dgssa: block {i} has {attns[i].num_heads} heads but the params say {params['num_heads']}."
                )
        inits: dict[int, torch.Tensor] = {}
        if ctx is not None:
            shapes = {i: (attns[i].num_heads, counts[i], counts[i]) for i in layers}
            inits = _analysis_means(ctx.analysis, layers, shapes)
            missing = [i for i in layers if i not in inits]
            if missing:
                inits.update(mean_attention(model, ctx.images, missing, ctx.batch_size))
        for i in layers:
            new = StaticAttention.from_attention(attns[i], counts[i])
            if i in inits:
                with torch.no_grad():
                    new.static_attn.copy_(inits[i].to(new.static_attn.dtype))
            unwrap_block(blocks[i]).attn = new

    def distill_layers(self, params: dict[str, Any]) -> list[int]:
        """The static blocks, except those behind a GLAD stage (their outputs have fewer tokens)."""
        layers = [int(i) for i in params["layers"]]
        tokens = params.get("layer_tokens") or [params.get("num_tokens")] * len(layers)
        return [i for i, n in zip(layers, tokens, strict=True) if n == params.get("num_tokens")]
