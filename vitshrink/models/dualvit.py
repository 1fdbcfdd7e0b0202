"""Dual Vision Transformer (Dual-ViT), registered with timm.

Paper: Yao et al., "Dual Vision Transformer", TPAMI 2023, https://arxiv.org/abs/2207.04976.
Official code (Apache-2.0): https://github.com/YehLi/ImageNetModel (``classification/dualvit.py``).

This is an independent implementation. Module and parameter names follow the official code, so an
official checkpoint's ``state_dict`` loads with a plain key copy (see :func:`vitshrink.convert.convert_dualvit`).

Layout: a conv stem (stride 4), then four stages. Stage 1 initialises the semantic tokens: 8x8
learnable queries cross-attend to the 7x7-average-pooled pixel tokens and are mixed with the pooled
tokens by a small squeeze-excitation gate. Stages 1-2 are *dual* blocks (semantic self-attention,
semantic-to-pixel cross-attention, semantic MLP; pixel queries attend to the semantic tokens only).
Stages 3-4 are *merge* blocks (pixels and semantics concatenated, full self-attention). A
class-attention block (class token = mean of all tokens) feeds ``head``; ``aux_head`` classifies every
pixel token (token labelling) and the output is ``head(cls) + 0.5 * max_tokens(aux_head(tokens))``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["DualViT", "dualvit_s", "dualvit_b", "dualvit_l", "DUALVIT_VARIANTS"]

NormLayer = Callable[[int], nn.Module]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims (heads already split)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def _split_heads(x: torch.Tensor, parts: int, num_heads: int) -> torch.Tensor:
    """(B, N, parts*C) -> (parts, B, heads, N, C/heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, parts, num_heads, c // parts // num_heads).permute(2, 0, 3, 1, 4)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class DWConv(nn.Module):
    """3x3 depth-wise conv applied to a (B, H*W, C) token sequence."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, hw[0], hw[1])
        return self.dwconv(x).flatten(2).transpose(1, 2)


class PVT2FFN(nn.Module):
    """fc1 -> depth-wise conv -> GELU -> fc2 (pixel tokens only)."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), hw)))


class MergeFFN(PVT2FFN):
    """PVT2FFN on the pixel tokens, a plain 2x MLP (``fc_proxy``) on the trailing semantic tokens."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__(in_features, hidden_features)
        self.fc_proxy = nn.Sequential(
            nn.Linear(in_features, 2 * in_features), nn.GELU(), nn.Linear(2 * in_features, in_features)
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        n_pix = hw[0] * hw[1]
        pixels, semantics = x[:, :n_pix], x[:, n_pix:]
        return torch.cat([super().forward(pixels, hw), self.fc_proxy(semantics)], dim=1)


class FFN(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q`` and ``kv`` projections (merge blocks)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q(x), 1, self.num_heads)[0]
        k, v = _split_heads(self.kv(x), 2, self.num_heads).unbind(0)
        return self.proj(_merge_heads(_attend(q, k, v, self.scale, self.fused_attn)))


class DualAttention(nn.Module):
    """Dual-pathway attention: semantic pathway (``*_proxy``) and pixel pathway (``q``/``kv``/``proj``)."""

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, layer_scale: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        # pixel pathway: pixel queries, keys/values from the semantic tokens
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        # semantic pathway: semantic queries over pixel keys/values
        self.q_proxy = nn.Linear(dim, dim)
        self.kv_proxy = nn.Linear(dim, dim * 2)
        self.q_proxy_ln = nn.LayerNorm(dim)
        self.p_ln = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp_proxy = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.ReLU(inplace=True), nn.Linear(4 * dim, dim)
        )
        self.proxy_ln = nn.LayerNorm(dim)
        self.qkv_proxy = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * 3))
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma3 = nn.Parameter(layer_scale * torch.ones(dim))

    def _semantic_self_attention(self, s: torch.Tensor) -> torch.Tensor:
        q, k, v = _split_heads(self.qkv_proxy(s), 3, self.num_heads).unbind(0)
        return _merge_heads(_attend(q, k, v, self.scale, self.fused_attn))

    def forward(self, x: torch.Tensor, semantics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: normed pixel tokens (B, N, C); semantics: (B, M, C). Returns (pixel update, new semantics)."""
        s = semantics + self.drop_path(self.gamma1 * self._semantic_self_attention(semantics))
        # semantics <- pixels (cross-attention), then the semantic MLP
        q_s = _split_heads(self.q_proxy(self.q_proxy_ln(s)), 1, self.num_heads)[0]
        k_p, v_p = _split_heads(self.kv_proxy(x), 2, self.num_heads).unbind(0)
        s = s + self.drop_path(
            _merge_heads(_attend(q_s, k_p, v_p, self.scale, self.fused_attn)) * self.gamma2
        )
        s = s + self.drop_path(self.gamma3 * self.mlp_proxy(self.p_ln(s)))
        # pixels <- semantics
        q = _split_heads(self.q(x), 1, self.num_heads)[0]
        k, v = _split_heads(self.kv(self.proxy_ln(s)), 2, self.num_heads).unbind(0)
        x = self.proj(_merge_heads(_attend(q, k, v, self.scale, self.fused_attn)))
        return x, s


class DualBlock(nn.Module):
    """Stage 1-2 block: dual attention + PVT2FFN, layer-scaled residuals."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        norm_layer: NormLayer = nn.LayerNorm,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm2 = norm_layer(dim)
        self.attn = DualAttention(dim, num_heads, drop_path=drop_path, layer_scale=layer_scale)
        self.mlp = PVT2FFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(
        self, x: torch.Tensor, hw: tuple[int, int], semantics: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        update, semantics = self.attn(self.norm1(x), semantics)
        x = x + self.drop_path(self.gamma1 * update)
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), hw))
        return x, semantics


class MergeBlock(nn.Module):
    """Stage 3-4 block: full self-attention over [pixels, semantics] + MergeFFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        norm_layer: NormLayer = nn.LayerNorm,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm2 = norm_layer(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = MergeFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.gamma1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), hw))
        return x


class ClassAttention(nn.Module):
    """The class token (first token) attends to all tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.kv = nn.Linear(dim, dim * 2)
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, v = _split_heads(self.kv(x), 2, self.num_heads).unbind(0)
        q = _split_heads(self.q(x[:, :1]), 1, self.num_heads)[0]
        return self.proj(_merge_heads(_attend(q, k, v, self.scale, self.fused_attn)))


class ClassBlock(nn.Module):
    """Class-attention block: updates the class token only."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, norm_layer: NormLayer = nn.LayerNorm
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.norm2 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads)
        self.mlp = FFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = x[:, :1] + self.attn(self.norm1(x))
        cls = cls + self.mlp(self.norm2(cls))
        return torch.cat([cls, x[:, 1:]], dim=1)


class Stem(nn.Module):
    """Three convs (stride 2) + a stride-2 projection: image -> (B, H/4*W/4, C) tokens."""

    def __init__(self, in_channels: int, hidden_dim: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.proj = nn.Conv2d(hidden_dim, out_channels, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(self.conv(x))
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class DownSamples(nn.Module):
    """Stride-2 3x3 conv between stages: (B, C, H, W) -> (B, H/2*W/2, C')."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SemanticEmbed(nn.Module):
    """Linear + LayerNorm that carries the semantic tokens to the next stage's width."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj_proxy = nn.Sequential(nn.Linear(in_channels, out_channels), nn.LayerNorm(out_channels))

    def forward(self, semantics: torch.Tensor) -> torch.Tensor:
        return self.proj_proxy(semantics)


def _rand_bbox(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """A random box covering about (1 - lam) of an h x w grid (token labelling's MixToken)."""
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, (1,))), int(torch.randint(0, w, (1,)))
    return (
        min(max(cy - cut_h // 2, 0), h),
        min(max(cx - cut_w // 2, 0), w),
        min(max(cy + cut_h // 2, 0), h),
        min(max(cx + cut_w // 2, 0), w),
    )


class DualViT(nn.Module):
    """Dual Vision Transformer.

    ``forward`` returns ``head(cls) + 0.5 * aux_head(pixel tokens).max(tokens)`` in both train and eval
    mode (timm convention, as VOLO); ``forward_train`` reproduces the official training output
    ``(cls_logits, aux_logits, bbox)`` with MixToken when ``use_mix_token`` and training.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        stem_hidden_dim: int = 32,
        embed_dims: tuple[int, ...] = (64, 128, 320, 448),
        num_heads: tuple[int, ...] = (2, 4, 10, 14),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 3),
        cls_mlp_ratio: float = 2.0,
        depths: tuple[int, ...] = (3, 4, 6, 3),
        num_semantic: int = 64,
        semantic_pool: int = 7,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: NormLayer | None = None,
        layer_scale: float = 1e-6,
        use_aux_head: bool = True,
        use_mix_token: bool = False,
        pooling_scale: int = 8,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', not {global_pool!r}")
        if len(embed_dims) != 4 or len(num_heads) != 4 or len(depths) != 4 or len(mlp_ratios) != 4:
            raise ValueError("embed_dims, num_heads, mlp_ratios and depths need 4 entries (one per stage)")
        side = int(round(num_semantic**0.5))
        if side * side != num_semantic:
            raise ValueError(f"num_semantic must be a square number, not {num_semantic}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        with torch.device(device) if device is not None else nullcontext():
            self._build(
                in_chans,
                num_classes,
                global_pool,
                stem_hidden_dim,
                tuple(embed_dims),
                tuple(num_heads),
                tuple(mlp_ratios),
                cls_mlp_ratio,
                tuple(depths),
                num_semantic,
                semantic_pool,
                drop_rate,
                drop_path_rate,
                norm_layer,
                layer_scale,
                use_aux_head,
                use_mix_token,
                pooling_scale,
            )
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(
        self,
        in_chans: int,
        num_classes: int,
        global_pool: str,
        stem_hidden_dim: int,
        embed_dims: tuple[int, ...],
        num_heads: tuple[int, ...],
        mlp_ratios: tuple[float, ...],
        cls_mlp_ratio: float,
        depths: tuple[int, ...],
        num_semantic: int,
        semantic_pool: int,
        drop_rate: float,
        drop_path_rate: float,
        norm_layer: NormLayer,
        layer_scale: float,
        use_aux_head: bool,
        use_mix_token: bool,
        pooling_scale: int,
    ) -> None:
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.depths = depths
        self.num_stages = 4
        self.sep_stage = 2  # stages before this one use dual blocks, the rest merge blocks
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.use_aux_head = use_aux_head
        self.mix_token = use_mix_token
        self.pooling_scale = pooling_scale
        self.beta = 1.0
        self.semantic_grid = int(round(num_semantic**0.5))
        self.grad_checkpointing = False
        self.feature_info: list[dict[str, Any]] = []

        total = sum(depths)
        dpr = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]  # stochastic depth decay
        c0 = embed_dims[0]
        # stage-1 semantic token initialisation (names as in the official code)
        self.q = nn.Parameter(torch.empty(num_semantic, c0))
        self.q_embed = nn.Sequential(nn.LayerNorm(c0), nn.Linear(c0, c0))
        self.pool = nn.AvgPool2d((semantic_pool, semantic_pool), stride=semantic_pool)
        self.kv = nn.Linear(c0, 2 * c0)
        self.scale = c0**-0.5
        self.proxy_ln = nn.LayerNorm(c0)
        self.se = nn.Sequential(nn.Linear(c0, c0), nn.ReLU(inplace=True), nn.Linear(c0, 2 * c0))

        cur = 0
        reduction = 4
        for i in range(self.num_stages):
            if i == 0:
                patch_embed: nn.Module = Stem(in_chans, stem_hidden_dim, embed_dims[0])
            else:
                patch_embed = DownSamples(embed_dims[i - 1], embed_dims[i])
                setattr(self, f"proxy_embed{i + 1}", SemanticEmbed(embed_dims[i - 1], embed_dims[i]))
                reduction *= 2
            if i >= self.sep_stage:
                blocks = nn.ModuleList(
                    MergeBlock(
                        embed_dims[i],
                        num_heads[i],
                        # the official code alternates the stage-3 MLP ratio (r, r-1, r, r-1, ...)
                        mlp_ratios[i] - 1 if (j % 2 and i == 2) else mlp_ratios[i],
                        drop_path=dpr[cur + j],
                        norm_layer=norm_layer,
                        layer_scale=layer_scale,
                    )
                    for j in range(depths[i])
                )
            else:
                blocks = nn.ModuleList(
                    DualBlock(
                        embed_dims[i],
                        num_heads[i],
                        mlp_ratios[i],
                        drop_path=dpr[cur + j],
                        norm_layer=norm_layer,
                        layer_scale=layer_scale,
                    )
                    for j in range(depths[i])
                )
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
            if i != self.num_stages - 1:
                setattr(self, f"norm_proxy{i + 1}", norm_layer(embed_dims[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"block{i + 1}"))

        self.post_network = nn.ModuleList(
            [ClassBlock(embed_dims[-1], num_heads[-1], cls_mlp_ratio, norm_layer=norm_layer)]
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head: nn.Module | None = (
            nn.Linear(embed_dims[-1], num_classes) if use_aux_head and num_classes > 0 else None
        )
        self.apply(self._init_weights)
        trunc_normal_(self.q, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^q$|^q_embed|^kv|^se|^proxy_ln|^patch_embed1",
            blocks=[
                (r"^block(\d+)\.(\d+)", None),
                (r"^(?:patch_embed|proxy_embed|norm_proxy|norm)(\d+)", (0,)),
                (r"^post_network", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` (and ``aux_head``) for ``num_classes`` classes (0: no classifier)."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', not {global_pool!r}")
            self.global_pool = global_pool
        param = self.q  # new layers go where the model is (device, dtype)
        self.head = (
            nn.Linear(self.num_features, num_classes, device=param.device, dtype=param.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.aux_head = (
            nn.Linear(self.num_features, num_classes, device=param.device, dtype=param.dtype)
            if self.use_aux_head and num_classes > 0
            else None
        )

    # ------------------------------------------------------------------ forward
    def _init_semantics(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Stage-1 semantic tokens from the stem tokens x (B, H*W, C)."""
        b, _, c = x.shape
        pooled = self.pool(x.transpose(1, 2).reshape(b, c, hw[0], hw[1]))
        ph, pw = pooled.shape[2], pooled.shape[3]
        pooled = pooled.flatten(2).transpose(1, 2)  # (B, M, C)
        k, v = self.kv(pooled).reshape(b, -1, 2, c).permute(2, 0, 1, 3).unbind(0)
        q = self.q
        if ph * pw != q.shape[0]:  # other input sizes: resize the query grid (as the official code)
            g = self.semantic_grid
            grid = q.reshape(1, g, g, c).permute(0, 3, 1, 2)
            q = F.interpolate(grid, size=(ph, pw), mode="bicubic").reshape(c, ph * pw).transpose(0, 1)
        attn = ((self.q_embed(q) @ k.transpose(-1, -2)) * self.scale).softmax(-1)
        semantics = attn @ v  # (B, M, C)
        both = torch.stack([semantics, pooled], dim=2)  # (B, M, 2, C)
        gate = self.se(both.sum(2).mean(1)).reshape(b, 2, c).softmax(1)
        return self.proxy_ln((both * gate.unsqueeze(1)).sum(2))

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_tokens(
        self, x: torch.Tensor, hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Stages 1-4 from the stem tokens. Returns (pixel tokens, semantic tokens, final grid), un-normed."""
        b = x.shape[0]
        semantics = self._init_semantics(x, hw)
        for i in range(self.num_stages):
            if i > 0:
                x, hw = getattr(self, f"patch_embed{i + 1}")(x)
                semantics = getattr(self, f"proxy_embed{i + 1}")(semantics)
            if i < self.sep_stage:
                for blk in getattr(self, f"block{i + 1}"):
                    x, semantics = self._run(blk, x, hw, semantics)
            else:
                n_pix = hw[0] * hw[1]
                tokens = torch.cat([x, semantics], dim=1)
                for blk in getattr(self, f"block{i + 1}"):
                    tokens = self._run(blk, tokens, hw)
                x, semantics = tokens[:, :n_pix], tokens[:, n_pix:]
            if i != self.num_stages - 1:
                x = getattr(self, f"norm{i + 1}")(x)
                x = x.reshape(b, hw[0], hw[1], -1).permute(0, 3, 1, 2)
                semantics = getattr(self, f"norm_proxy{i + 1}")(semantics)
        return x, semantics, hw

    def forward_cls(self, x: torch.Tensor, semantics: torch.Tensor) -> torch.Tensor:
        """Class attention; returns normed [cls, pixel tokens] (B, 1 + H*W, C)."""
        n_pix = x.shape[1]
        tokens = torch.cat([x, semantics], dim=1)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        for blk in self.post_network:
            tokens = blk(tokens)
        # the semantic tokens only feed the class token: drop them here (norm4 is per token)
        return self.norm4(tokens[:, : 1 + n_pix])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> normed [class token, final-stage pixel tokens], (B, 1 + H/32*W/32, C)."""
        x, hw = self.patch_embed1(x)
        x, semantics, _ = self.forward_tokens(x, hw)
        return self.forward_cls(x, semantics)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[cls, pixel tokens] -> logits ``head(cls) + 0.5 * max over tokens of aux_head(tokens)``."""
        if self.global_pool == "avg":
            out = x[:, 1:].mean(dim=1)
        elif self.global_pool == "token":
            out = x[:, 0]
        else:
            out = x
        out = self.head_drop(out)
        if pre_logits:
            return out
        out = self.head(out)
        if self.aux_head is not None and self.global_pool:
            out = out + 0.5 * self.aux_head(self.head_drop(x[:, 1:])).max(1)[0]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_train(
        self, x: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
        """The official training forward (token labelling): ``(cls_logits, aux_logits, bbox)`` in train mode.

        With ``use_mix_token`` a random box of stem tokens is swapped with the flipped batch (MixToken)
        and ``aux_logits`` are un-mixed. In eval mode, or without ``aux_head``, returns ``forward(x)``.
        """
        if not self.training or self.aux_head is None:
            return self.forward(x)
        x, hw = self.patch_embed1(x)
        b, _, c = x.shape
        bbox = (0, 0, 0, 0)
        ph, pw = hw[0] // self.pooling_scale, hw[1] // self.pooling_scale
        if self.mix_token:
            lam = float(torch.distributions.Beta(self.beta, self.beta).sample())
            bbox = _rand_bbox(ph, pw, lam)
            s = self.pooling_scale
            grid = x.reshape(b, hw[0], hw[1], c)
            mixed = grid.clone()
            y1, x1, y2, x2 = (v * s for v in bbox)
            mixed[:, y1:y2, x1:x2] = grid.flip(0)[:, y1:y2, x1:x2]
            x = mixed.reshape(b, -1, c)
        x, semantics, hw4 = self.forward_tokens(x, hw)
        feats = self.forward_cls(x, semantics)
        x_cls = self.head(self.head_drop(feats[:, 0]))
        x_aux = self.aux_head(self.head_drop(feats[:, 1:]))
        if self.mix_token:
            y1, x1, y2, x2 = bbox
            aux = x_aux.reshape(b, hw4[0], hw4[1], -1)
            unmixed = aux.clone()
            unmixed[:, y1:y2, x1:x2] = aux.flip(0)[:, y1:y2, x1:x2]
            x_aux = unmixed.reshape(b, hw4[0] * hw4[1], -1)
        return x_cls, x_aux, bbox


def _create_dualvit(variant: str, pretrained: bool = False, **kwargs: Any) -> DualViT:
    if kwargs.get("features_only"):
        raise RuntimeError("features_only is not supported for Dual-ViT")
    return build_model_with_cfg(DualViT, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "hf_hub_id": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.96,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.conv.0",
        "classifier": ("head", "aux_head"),
        "license": "apache-2.0",
        "paper_ids": "arXiv:2207.04976",
        "paper_name": "Dual Vision Transformer",
        "origin_url": "https://github.com/YehLi/ImageNetModel",
        "notes": (
            "Official weights are .pth.tar files; convert them with vitshrink.convert.convert_dualvit.",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "dualvit_s.in1k": _cfg(),
        "dualvit_s.in1k_384": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
        "dualvit_b.in1k": _cfg(),
        "dualvit_b.in1k_384": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
        "dualvit_l.in1k": _cfg(),
        "dualvit_l.in1k_384": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    }
)

DUALVIT_VARIANTS: dict[str, dict[str, Any]] = {
    "dualvit_s": dict(
        stem_hidden_dim=32,
        embed_dims=(64, 128, 320, 448),
        num_heads=(2, 4, 10, 14),
        mlp_ratios=(8, 8, 4, 3),
        depths=(3, 4, 6, 3),
    ),
    "dualvit_b": dict(
        stem_hidden_dim=64,
        embed_dims=(64, 128, 320, 512),
        num_heads=(2, 4, 10, 16),
        mlp_ratios=(8, 8, 4, 3),
        depths=(3, 4, 15, 3),
    ),
    "dualvit_l": dict(
        stem_hidden_dim=64,
        embed_dims=(96, 192, 384, 512),
        num_heads=(3, 6, 12, 16),
        mlp_ratios=(8, 8, 4, 3),
        depths=(3, 6, 21, 3),
    ),
}
"""Architecture arguments of each variant (as in the official ``dualvit_{s,b,l}`` functions)."""


@register_model
def dualvit_s(pretrained: bool = False, **kwargs: Any) -> DualViT:
    """Dual-ViT-S: 25.1M params, 5.4 GFLOPs (published), 84.1% ImageNet top-1 at 224."""
    return _create_dualvit("dualvit_s", pretrained, **{**DUALVIT_VARIANTS["dualvit_s"], **kwargs})


@register_model
def dualvit_b(pretrained: bool = False, **kwargs: Any) -> DualViT:
    """Dual-ViT-B: 42.6M params, 9.3 GFLOPs (published), 85.2% ImageNet top-1 at 224."""
    return _create_dualvit("dualvit_b", pretrained, **{**DUALVIT_VARIANTS["dualvit_b"], **kwargs})


@register_model
def dualvit_l(pretrained: bool = False, **kwargs: Any) -> DualViT:
    """Dual-ViT-L: 73.0M params, 18.0 GFLOPs (published), 85.7% ImageNet top-1 at 224."""
    return _create_dualvit("dualvit_l", pretrained, **{**DUALVIT_VARIANTS["dualvit_l"], **kwargs})
