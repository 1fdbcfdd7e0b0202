"""Truncated-basis attention for pretrained models, after Pan et al., arXiv 2405.13901 ("Discrete
Cosine Transform Based Decorrelated Attention for Vision Transformers").

The paper transforms each token's channels with the orthonormal DCT-II, keeps the first ``tau * C``
coefficients, runs q/k/v in that truncated space (``qkv = Linear(tau C, 3 tau C)``, head dim
``tau * C / heads``) and zero-pads the attention output back to C before the output projection.

For a *pretrained* model we map the weights into an orthonormal basis instead of training:

* input side: ``x_k = P D x`` with ``D`` (C x C) orthonormal and ``P`` keeping the first
  ``k = tau * C`` rows; the qkv weight becomes ``W P D^T`` (columns), exact when ``k = C``;
* output side: a per-head orthonormal basis ``E`` (head_dim x head_dim) rotates each head's q, k
  (same ``E``, so q.k is preserved) and v (its own ``E_v``); the first ``tau * head_dim`` rows are kept;
* output projection: ``proj' = W_proj E_v^T`` (a ``Linear(tau C, C)``), which is exactly the paper's
  zero-pad-then-project when the padded vector is read in the basis (the padded zeros meet columns of
  ``W_proj E_v^T`` that are simply dropped), and cheaper.

``basis`` chooses ``D``/``E``: 'dct' (the paper's), 'pca' (principal axes of the calibration tokens at
each attention input, and of the resulting q/k and v per head; mean corrections go into the biases)
or 'svd' (singular vectors of the weights, no data). With ``tau = 1`` every basis reproduces the
original attention up to float rounding. The attention scale stays the original ``head_dim ** -0.5``
so the truncated logits approximate the pretrained ones.

When ``tau < 2/3`` the input transform is kept as a fixed buffer ``basis`` (``Linear(k, 3k)`` after a
``k x C`` projection, the paper's structure, cheaper); otherwise it is folded into ``qkv``
(``Linear(C, 3k)``, one matmul, cheaper there).
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.swin_transformer import WindowAttention
from torch import nn

from vitshrink.dct_init import dct_matrix
from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import CalibrationContext, Method, parse_layers, register_method

__all__ = [
    "DCT",
    "DCTAttention",
    "DCTWindowAttention",
    "attention_modules",
    "dct_matrix",
    "rewrite_attention",
]

BASES = ("dct", "pca", "svd")


class _TruncatedMixin:
    """Shared bits of the truncated attentions (``basis`` buffer: fixed input transform or None)."""

    basis: torch.Tensor | None
    keep: float

    def _to_basis(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.basis is None else F.linear(x, self.basis)


class DCTAttention(_TruncatedMixin, Attention):
    """timm ``Attention`` whose q/k/v live in a truncated orthonormal basis (head dim ``tau * d``)."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = (
            self.qkv(self._to_basis(x)).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
                scale=self.scale,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(n, attn, attn_mask, is_causal))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(x))


class DCTWindowAttention(_TruncatedMixin, WindowAttention):
    """Swin ``WindowAttention`` with truncated q/k/v; relative position bias and shift masks intact."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        b, n, _ = x.shape
        h = self.num_heads
        qkv = self.qkv(self._to_basis(x)).reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, n, n).expand(b // num_win, -1, h, -1, -1)
            bias = bias + mask.reshape(-1, h, n, n)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=bias,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                scale=self.scale,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            attn = self.attn_drop(self.softmax(attn))
            x = attn @ v
        x = x.transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(x))


_SUPPORTED = {Attention: DCTAttention, WindowAttention: DCTWindowAttention}


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every timm ``Attention`` / Swin ``WindowAttention`` (plain or already truncated), in model order."""
    kinds = (*_SUPPORTED, *_SUPPORTED.values())
    return [(name, m) for name, m in model.named_modules() if type(m) in kinds]


def _dims(attn: nn.Module) -> tuple[int, int, int]:
    """(input channels C, heads h, head dim d) of a plain attention."""
    c = attn.qkv.in_features
    h = attn.num_heads
    return c, h, attn.qkv.out_features // 3 // h


def _check_attention(name: str, attn: nn.Module) -> None:
    if type(attn) in _SUPPORTED.values():
        raise VitshrinkError(f"dct is already applied to '{name}': apply it once.")
    if isinstance(attn, Attention):
        extra = [
            label
            for label, bad in (
                (
                    "qk_norm",
                    not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity),
                ),
                ("scale_norm", not isinstance(attn.norm, nn.Identity)),
                ("gated", attn.gate is not None),
            )
            if bad
        ]
        if extra:
            raise VitshrinkError(
                f"dct: attention '{name}' uses {', '.join(extra)}, which a basis change does not preserve; "
                "dct supports plain ViT/DeiT/Swin attention only."
            )


def _valid_hint(head_dims: list[int]) -> str:
    g = reduce(math.gcd, head_dims)
    common = [Fraction(j, g) for j in range(1, g + 1)]
    if len(common) <= 8:
        shown = common
    else:
        shown = [f for f in common if f in (Fraction(1, 4), Fraction(1, 2), Fraction(3, 4), Fraction(1))]
    text = ", ".join(f"{float(f):g}" for f in shown)
    return f"valid values are multiples of 1/{g} in (0, 1], e.g. {text}"


def _head_keep(tau: float, d: int, c: int, name: str, hint: str) -> tuple[int, int]:
    """(kept head dim, kept input channels) for ``tau``, or a clear error."""
    if not 0.0 < tau <= 1.0:
        raise VitshrinkError(f"dct: keep={tau:g} must be in (0, 1]; {hint}.")
    dk, kin = tau * d, tau * c
    if abs(dk - round(dk)) > 1e-6 or abs(kin - round(kin)) > 1e-6 or round(dk) < 1:
        raise VitshrinkError(
            f"dct: keep={tau:g} gives head dim {dk:g} (of {d}) in '{name}', not a whole number; {hint}."
        )
    return int(round(dk)), int(round(kin))


def _parse_keep(value: Any, count: int) -> list[float]:
    """One keep ratio per selected layer from a number, a list or a comma-separated string."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
        if len(value) == 1:
            value = value[0]
    try:
        if isinstance(value, (list, tuple)):
            keep = [float(v) for v in value]
        else:
            keep = [float(value)] * count
    except (TypeError, ValueError):
        raise VitshrinkError(
            f"dct: keep={value!r} is not a number: give a ratio such as 0.5, or one per layer such as 0.75,0.5."
        ) from None
    if len(keep) != count:
        raise VitshrinkError(
            f"dct: keep has {len(keep)} values but dct applies to {count} attention layers: give one value or one per layer."
        )
    return keep


# ----------------------------------------------------------------------------------------------
# Bases and the weight mapping


def _eig_rows(mat: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric ``mat`` (..., n, n) as rows, by decreasing eigenvalue."""
    _, vecs = torch.linalg.eigh((mat + mat.transpose(-1, -2)) / 2)
    return vecs.flip(-1).transpose(-1, -2)


def _block_diag(bases: torch.Tensor, keep: int) -> torch.Tensor:
    """(h, d, d) per-head bases -> block-diagonal (h * keep, h * d) keeping the first rows of each."""
    return torch.block_diag(*[e[:keep] for e in bases])


class _Stats:
    """Running first and second moments of one attention's input tokens (float64)."""

    def __init__(self, c: int, device: torch.device) -> None:
        self.n = 0
        self.sum = torch.zeros(c, dtype=torch.float64, device=device)
        self.outer = torch.zeros(c, c, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / max(self.n, 1)
        return mean, self.outer / max(self.n, 1) - torch.outer(mean, mean)


def _collect_stats(model: nn.Module, attns: list[nn.Module], ctx: CalibrationContext) -> list[_Stats]:
    stats = [_Stats(a.qkv.in_features, a.qkv.weight.device) for a in attns]
    hooks = [
        a.register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0]))
        for a, s in zip(attns, stats, strict=True)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in ctx.batches():
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not stats or stats[0].n == 0:
        raise VitshrinkError("dct: basis=pca needs calibration images, but none were given.")
    return stats


def _bias(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias.detach().to(torch.float64)
    return torch.zeros(linear.out_features, dtype=torch.float64, device=linear.weight.device)


def rewrite_attention(attn: nn.Module, tau: float, basis: str, stats: _Stats | None = None) -> nn.Module:
    """Rewrite one plain attention in place into its truncated form with the ``basis`` mapping.

    ``stats`` (input moments) is needed for 'pca'; without it 'pca' falls back to the DCT mapping,
    which is only right as a placeholder before loading a saved state dict.
    """
    c, h, d = _dims(attn)
    dk, kin = _head_keep(tau, d, c, type(attn).__name__, _valid_hint([d]))
    a = h * d
    w = attn.qkv.weight.detach().to(torch.float64)
    dev = w.device
    b0 = _bias(attn.qkv)
    wp, bp = attn.proj.weight.detach().to(torch.float64), _bias(attn.proj)
    wq, wk, wv = w.split(a)

    if basis == "pca" and stats is not None:
        mean, cov = stats.mean_cov()
        d_in = _eig_rows(cov)
    elif basis == "svd":
        mean, cov = (
            torch.zeros(c, dtype=torch.float64, device=dev),
            torch.eye(c, dtype=torch.float64, device=dev),
        )
        d_in = _eig_rows(w.T @ w)  # right singular vectors of the qkv weight
    else:
        mean = torch.zeros(c, dtype=torch.float64, device=dev)
        cov = None
        d_in = dct_matrix(c, dtype=torch.float64, device=dev)
    p = d_in[:kin]  # (kin, C)
    proj_in = p.T @ p  # projector onto the kept input subspace
    b = b0 + w @ (mean - proj_in @ mean)  # the mean passes exactly (zero for dct / svd)
    mq, mk, mv = (w @ mean + b0).split(a)  # means of q, k, v over the calibration tokens

    if cov is None:
        e_qk = e_v = dct_matrix(d, dtype=torch.float64, device=dev).expand(h, d, d)
    else:
        cov_in = proj_in @ cov @ proj_in  # covariance of the truncated input

        def heads(mat: torch.Tensor) -> torch.Tensor:  # (a, a) -> per-head diagonal blocks (h, d, d)
            return torch.stack([mat[i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(h)])

        second_qk = wq @ cov_in @ wq.T + torch.outer(mq, mq) + wk @ cov_in @ wk.T + torch.outer(mk, mk)
        e_qk = _eig_rows(heads(second_qk))
        e_v = _eig_rows(heads(wv @ cov_in @ wv.T))
    bqk, bv_basis = _block_diag(e_qk, dk), _block_diag(e_v, dk)  # (h dk, a)

    w_in = w @ p.T  # (3a, kin)
    bq, bk, bv = b.split(a)
    new_w = torch.cat([bqk @ w_in[:a], bqk @ w_in[a : 2 * a], bv_basis @ w_in[2 * a :]])
    new_b = torch.cat([bqk @ bq, bqk @ bk, bv_basis @ bv])
    new_wp = wp @ bv_basis.T
    new_bp = bp + wp @ (mv - bv_basis.T @ (bv_basis @ mv))  # the v mean lost by truncation, via proj

    ak = h * dk
    fold = 3 * ak * c <= kin * c + 3 * ak * kin
    if fold:
        new_w = new_w @ p
    _install(attn, new_w, new_b, new_wp, new_bp, None if fold else p, dk, tau)
    return attn


def _install(
    attn: nn.Module,
    qkv_w: torch.Tensor,
    qkv_b: torch.Tensor,
    proj_w: torch.Tensor,
    proj_b: torch.Tensor,
    basis: torch.Tensor | None,
    dk: int,
    tau: float,
) -> None:
    ref = attn.qkv.weight
    kw = {"device": ref.device, "dtype": ref.dtype}
    qkv = nn.Linear(qkv_w.shape[1], qkv_w.shape[0], bias=True, **kw)
    proj = nn.Linear(proj_w.shape[1], proj_w.shape[0], bias=True, **kw)
    with torch.no_grad():
        qkv.weight.copy_(qkv_w)
        qkv.bias.copy_(qkv_b)
        proj.weight.copy_(proj_w)
        proj.bias.copy_(proj_b)
    scale = attn.scale  # the original head_dim ** -0.5
    attn.__class__ = _SUPPORTED[type(attn)]
    attn.qkv, attn.proj = qkv, proj
    attn.register_buffer("basis", None if basis is None else basis.to(**kw).contiguous())
    attn.scale = scale
    attn.keep = tau
    if isinstance(attn, Attention):
        attn.head_dim = dk
        attn.attn_dim = dk * attn.num_heads


# ----------------------------------------------------------------------------------------------
# The method


@register_method
class DCT(Method):
    """Truncated-basis (DCT / PCA / SVD) attention, pretrained weights mapped into the basis."""

    name = "dct"
    defaults = {"keep": 0.75, "basis": "dct", "layers": None}
    help = {
        "keep": "tau: share of channels kept in q/k/v (head dim tau*d must be whole); one value or one per layer",
        "basis": "dct (the paper's), pca (calibration tokens per layer) or svd (weights, no data)",
        "layers": "attention layers to rewrite (indices in model order, e.g. '0-5'); default all",
    }

    def check(self, model: nn.Module) -> None:
        attns = attention_modules(model)
        if not attns:
            others = sorted(
                {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")}
            )
            found = (
                f" (found {', '.join(others)}; apply dct before methods that replace attention)"
                if others
                else ""
            )
            raise VitshrinkError(
                f"dct: {type(model).__name__} has no timm Attention or Swin WindowAttention{found}: "
                "dct supports ViT, DeiT and Swin."
            )
        for name, attn in attns:
            _check_attention(name, attn)

    def resolve(self, model: nn.Module, knobs: dict[str, Any], analysis: Any | None) -> dict[str, Any]:
        self.check(model)
        params = {**self.defaults, **knobs}
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise VitshrinkError(
                f"dct: unknown knob(s) {', '.join(sorted(unknown))}; known: keep, basis, layers."
            )
        attns = attention_modules(model)
        layers = parse_layers(params["layers"], len(attns), "layers")
        if layers == "auto":
            layers = list(range(len(attns)))
        if not layers:
            raise VitshrinkError("dct: layers is empty: give at least one attention layer index.")
        basis = str(params["basis"]).lower()
        if basis not in BASES:
            raise VitshrinkError(f"dct: basis='{params['basis']}' is not one of {', '.join(BASES)}.")
        keep = _parse_keep(params["keep"], len(layers))
        hint = _valid_hint([_dims(attns[i][1])[2] for i in layers])
        for i, tau in zip(layers, keep, strict=True):
            name, attn = attns[i]
            c, _, d = _dims(attn)
            _head_keep(tau, d, c, name, hint)
        family = "vit" if all(isinstance(m, Attention) for _, m in attns) else "swin"
        return {
            "keep": keep[0] if len(set(keep)) == 1 else keep,
            "basis": basis,
            "layers": layers,
            "family": family,
        }

    def apply(self, model: nn.Module, params: dict[str, Any], ctx: CalibrationContext | None) -> None:
        self.check(model)
        attns = attention_modules(model)
        layers = params.get("layers") or list(range(len(attns)))
        layers = parse_layers(layers, len(attns), "layers")
        assert isinstance(layers, list)
        keep = _parse_keep(params.get("keep", self.defaults["keep"]), len(layers))
        basis = str(params.get("basis", "dct")).lower()
        if basis not in BASES:
            raise VitshrinkError(f"dct: basis='{basis}' is not one of {', '.join(BASES)}.")
        hint = _valid_hint([_dims(attns[i][1])[2] for i in layers])
        for i, tau in zip(layers, keep, strict=True):
            name, attn = attns[i]
            c, _, d = _dims(attn)
            _head_keep(tau, d, c, name, hint)
        selected = [attns[i][1] for i in layers]
        stats: list[_Stats | None] = [None] * len(selected)
        if basis == "pca" and ctx is not None:
            stats = list(_collect_stats(model, selected, ctx))
        for attn, tau, st in zip(selected, keep, stats, strict=True):
            rewrite_attention(attn, tau, basis, st)

    def distill_layers(self, params: dict[str, Any]) -> list[int]:
        # For ViT/DeiT the attention index is the block index; Swin blocks are not in model.blocks.
        return list(params.get("layers") or []) if params.get("family") == "vit" else []
