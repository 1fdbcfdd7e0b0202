"""GLAD: global aggregation pyramid (our design after the abstract of Yu et al., arXiv 2310.07664).

Before each chosen block, the N patch tokens are replaced by M < N new tokens, each a learned
weighted sum of all old patch tokens (``x_patch' = W @ x_patch + b``, ``W`` of shape (M, N), ``b``
of shape (M, C)); prefix tokens (class, distillation, registers) pass unchanged. Several stages form
a pyramid (each stage's N is the previous stage's M). The chosen block ``blocks[i]`` is replaced by
:class:`GladStage` holding ``reduce`` (the token map) and ``block`` (the original block), so state-dict
keys read ``blocks.6.reduce.weight`` and ``blocks.6.block.attn.qkv.weight``.

``W`` starts as area-weighted average pooling on the patch grid (``init='pool'``) or as that pooling
map projected onto the top-M principal directions of the calibration tokens over the token axis
(``init='pca'``, see :func:`pca_init`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import (
    CalibrationContext,
    Method,
    parse_layers,
    register_method,
    vit_blocks,
)

INITS = ("pool", "pca")


class TokenReduce(nn.Module):
    """Learned linear map over the token axis: N patch tokens -> M, prefix tokens kept."""

    def __init__(
        self,
        num_prefix_tokens: int,
        in_tokens: int,
        out_tokens: int,
        dim: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.in_tokens = in_tokens
        self.out_tokens = out_tokens
        self.weight = nn.Parameter(
            torch.full((out_tokens, in_tokens), 1.0 / in_tokens, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.zeros(out_tokens, dim, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_prefix_tokens + self.in_tokens:
            raise VitshrinkError(
                f"GLAD stage expects {self.num_prefix_tokens + self.in_tokens} tokens but got "
                f"{x.shape[1]}: the compressed model is bound to the input size it was built for; "
                "resize the input to that size."
            )
        p = self.num_prefix_tokens
        patches = torch.matmul(self.weight, x[:, p:])
        if self.bias is not None:
            patches = patches + self.bias
        if p:
            return torch.cat([x[:, :p], patches], dim=1)
        return patches

    def extra_repr(self) -> str:
        return (
            f"prefix={self.num_prefix_tokens}, in_tokens={self.in_tokens}, "
            f"out_tokens={self.out_tokens}, bias={self.bias is not None}"
        )


class GladStage(nn.Module):
    """A transformer block preceded by a :class:`TokenReduce`."""

    def __init__(self, reduce: TokenReduce, block: nn.Module) -> None:
        super().__init__()
        self.reduce = reduce
        self.block = block

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitshrinkError(
                "A GLAD stage changes the token count, so attention masks are not supported."
            )
        return self.block(self.reduce(x))


def _check_not_swin(model: nn.Module) -> None:
    if "swin" in type(model).__name__.lower():
        raise VitshrinkError(
            "glad needs a global token sequence; Swin's windowed attention does not have one. "
            "Use a ViT/DeiT model."
        )


def base_num_patches(model: nn.Module) -> int:
    """Patch tokens the patch embedding produces (before any GLAD stage)."""
    num = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if not isinstance(num, int) or num < 1:
        raise VitshrinkError(
            f"{type(model).__name__} has no fixed patch count (patch_embed.num_patches): "
            "this method needs a timm ViT/DeiT with a fixed input size."
        )
    return num


def block_token_counts(model: nn.Module) -> list[int]:
    """Tokens (prefix + patch) that reach each block's attention, after any GLAD stage."""
    blocks = vit_blocks(model)
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    patches = base_num_patches(model)
    counts = []
    for block in blocks:
        if isinstance(block, GladStage):
            patches = block.reduce.out_tokens
        counts.append(prefix + patches)
    return counts


def _avg_matrix(n: int, m: int) -> torch.Tensor:
    """(m, n) adaptive 1-D average pooling (PyTorch's adaptive pooling windows)."""
    mat = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        lo, hi = (i * n) // m, -((-(i + 1) * n) // m)
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return mat


def next_grid(grid: tuple[int, int] | None, tokens: int) -> tuple[int, int] | None:
    """The (rows, cols) grid of ``tokens`` pooled cells closest in shape to ``grid``, or None (1-D)."""
    if grid is None:
        return None
    h, w = grid
    best: tuple[float, int, tuple[int, int]] | None = None
    for a in range(1, h + 1):
        if tokens % a or tokens // a > w:
            continue
        b = tokens // a
        score = (abs(math.log(a * w / (b * h))), -a, (a, b))
        if best is None or score[:2] < best[:2]:
            best = score
    return best[2] if best else None


def pool_matrix(
    in_tokens: int, out_tokens: int, grid_in: tuple[int, int] | None, grid_out: tuple[int, int] | None
) -> torch.Tensor:
    """(out, in) area-weighted average pooling, 2-D on the patch grid when both grids are known."""
    if grid_in is not None and grid_out is not None and grid_in[0] * grid_in[1] == in_tokens:
        return torch.kron(_avg_matrix(grid_in[0], grid_out[0]), _avg_matrix(grid_in[1], grid_out[1]))
    return _avg_matrix(in_tokens, out_tokens)


def pca_init(pool: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Pooling map projected onto the top-M principal token directions.

    ``second_moment`` is ``sum_images X X^T`` over calibration patch-token matrices X (N, C), i.e. the
    channels as samples in R^N. With ``U`` (N, M) its top-M eigenvectors, ``U^T`` is the best rank-M
    token reduction for reconstruction (``X ~ U U^T X``); any ``G U^T`` reconstructs as well, and
    ``G = P U`` gives the one closest to the pooling map ``P``: ``W = P U U^T``. It keeps pooling's
    scale and sign (rows sum to about 1) while spending its M directions on the data's principal
    token subspace.
    """
    m = pool.shape[0]
    _, vecs = torch.linalg.eigh(second_moment.double())
    u = vecs[:, -m:]
    return pool.double() @ u @ u.T


@torch.no_grad()
def _token_second_moment(
    model: nn.Module, module: nn.Module, ctx: CalibrationContext, prefix: int
) -> torch.Tensor:
    acc: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0][:, prefix:].double()
        mom = torch.einsum("bnc,bmc->nm", x, x)
        acc["k"] = acc["k"] + mom if "k" in acc else mom

    handle = module.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for batch in ctx.batches():
            model(batch)
    finally:
        handle.remove()
        model.train(was_training)
    return acc["k"]


def _parse_tokens(value: Any) -> list[int] | None:
    if value is None or value == "auto" or value == "":
        return None
    if isinstance(value, int):
        return [value]
    try:
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise VitshrinkError(
            f"glad tokens='{value}' is not a list of token counts: use e.g. '98,49' or leave it unset "
            "to use ratio."
        ) from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off"}:
        return False
    raise VitshrinkError(f"glad bias={value!r} must be true or false.")


def fallback_layers(depth: int, stages: int) -> list[int]:
    """Default stage positions without analysis: evenly in the second half (12 blocks, 2 stages: 6, 9)."""
    half = depth // 2
    layers = sorted({half + (j * (depth - half)) // stages for j in range(stages)})
    if len(layers) < stages or half < 1:
        raise VitshrinkError(
            f"glad: a model with {depth} blocks is too shallow for {stages} stages; "
            "set glad layers explicitly or use fewer stages."
        )
    return layers


@register_method
class Glad(Method):
    """Global aggregation pyramid: learned token reduction before later blocks."""

    name = "glad"
    defaults = {
        "layers": "auto",
        "tokens": None,
        "ratio": 0.5,
        "stages": 2,
        "init": "pool",
        "bias": True,
    }
    help = {
        "layers": "blocks before which tokens are reduced ('auto': from analysis, else depth/2 and 3*depth/4)",
        "tokens": "patch tokens kept by each stage, e.g. '98,49' (overrides ratio)",
        "ratio": "share of patch tokens each stage keeps when tokens is unset",
        "stages": "how many stages 'auto' may place",
        "init": "token-map initialisation: 'pool' (2-D average pooling) or 'pca' (pooling on the "
        "calibration tokens' principal subspace)",
        "bias": "learn a per-new-token bias (M x C), zero-initialised",
    }

    def check(self, model: nn.Module) -> None:
        _check_not_swin(model)
        vit_blocks(model)
        base_num_patches(model)
        if hasattr(model, "_tome_state"):
            raise VitshrinkError(
                "glad cannot be combined with tome: token merging already changes the token count "
                "in every block. Use one of them."
            )

    def resolve(self, model: nn.Module, knobs: dict[str, Any], analysis: Any | None) -> dict[str, Any]:
        self.check(model)
        unknown = sorted(set(knobs) - set(self.defaults))
        if unknown:
            raise VitshrinkError(f"glad has no knob '{unknown[0]}'; knobs: {', '.join(self.defaults)}.")
        p = {**self.defaults, **knobs}
        blocks = vit_blocks(model)
        depth = len(blocks)
        if any(isinstance(b, GladStage) for b in blocks):
            raise VitshrinkError(
                "glad is already applied to this model; apply it once (it builds the whole pyramid)."
            )
        init = str(p["init"])
        if init not in INITS:
            raise VitshrinkError(f"glad init='{init}' is unknown: use one of {', '.join(INITS)}.")
        tokens = _parse_tokens(p["tokens"])
        try:
            ratio = float(p["ratio"])
            stages = int(p["stages"])
        except (TypeError, ValueError):
            raise VitshrinkError("glad ratio must be a number in (0, 1) and stages a whole number.") from None
        if not 0.0 < ratio < 1.0:
            raise VitshrinkError(f"glad ratio={ratio} must be between 0 and 1 (e.g. 0.5 halves the tokens).")
        if stages < 1:
            raise VitshrinkError(f"glad stages={stages} must be at least 1.")
        layers = parse_layers(p["layers"], depth, "glad layers")
        if layers == "auto":
            want = len(tokens) if tokens else stages
            suggested: list[int] = []
            if analysis is not None and getattr(analysis, "depth", None) == depth:
                suggested = analysis.suggest_layers(glad_ratio=ratio, glad_stages=want)["glad"]
            if suggested and (tokens is None or len(suggested) == want):
                layers = suggested
            else:
                layers = fallback_layers(depth, want)
        assert isinstance(layers, list)
        if not layers:
            raise VitshrinkError("glad layers is empty: give at least one block index.")
        if tokens is not None and len(tokens) != len(layers):
            raise VitshrinkError(
                f"glad has {len(layers)} stage(s) (layers {layers}) but tokens lists {len(tokens)} "
                "count(s): give one token count per stage."
            )
        n = base_num_patches(model)
        resolved: list[int] = []
        for s, layer in enumerate(layers):
            m = tokens[s] if tokens is not None else max(1, round(n * ratio))
            if not 1 <= m < n:
                raise VitshrinkError(
                    f"glad stage {s + 1} (before block {layer}) keeps {m} tokens but receives {n}: "
                    f"each stage must keep between 1 and {n - 1} patch tokens."
                )
            resolved.append(int(m))
            n = m
        return {
            "layers": [int(i) for i in layers],
            "tokens": resolved,
            "init": init,
            "bias": _as_bool(p["bias"]),
            "num_patches": base_num_patches(model),
        }

    def apply(self, model: nn.Module, params: dict[str, Any], ctx: CalibrationContext | None) -> None:
        self.check(model)
        blocks = vit_blocks(model)
        layers = [int(i) for i in params["layers"]]
        tokens = [int(m) for m in params["tokens"]]
        if len(layers) != len(tokens) or layers != sorted(set(layers)):
            raise VitshrinkError(
                "glad params are inconsistent: need sorted distinct layers and one token count each."
            )
        if params.get("num_patches", base_num_patches(model)) != base_num_patches(model):
            raise VitshrinkError(
                f"glad was built for {params['num_patches']} patch tokens but this model makes "
                f"{base_num_patches(model)}: create the model with the input size it was compressed at."
            )
        if layers[-1] >= len(blocks):
            raise VitshrinkError(
                f"glad layers: block index {layers[-1]} is out of range; this model has blocks 0-{len(blocks) - 1}."
            )
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        dim = int(getattr(model, "embed_dim", 0) or model.num_features)
        ref = next(model.parameters())
        grid_attr = getattr(model.patch_embed, "grid_size", None)
        grid: tuple[int, int] | None = (
            (int(grid_attr[0]), int(grid_attr[1])) if grid_attr is not None else None
        )
        counts = block_token_counts(model)
        for layer, m in zip(layers, tokens, strict=True):
            block = blocks[layer]
            if isinstance(block, GladStage):
                raise VitshrinkError(f"glad: block {layer} already has a GLAD stage; apply glad once.")
            n = counts[layer] - prefix
            if not 1 <= m < n:
                raise VitshrinkError(f"glad: block {layer} receives {n} patch tokens, cannot keep {m}.")
            reduce = TokenReduce(prefix, n, m, dim, _as_bool(params.get("bias", True)), ref.device, ref.dtype)
            stage = GladStage(reduce, block)
            blocks[layer] = stage
            counts = block_token_counts(model)
            grid_out = next_grid(grid, m)
            if ctx is not None:
                weight = pool_matrix(n, m, grid, grid_out)
                if params.get("init", "pool") == "pca":
                    weight = pca_init(weight, _token_second_moment(model, stage, ctx, prefix))
                with torch.no_grad():
                    reduce.weight.copy_(weight.to(reduce.weight.dtype))
            grid = grid_out

    def distill_layers(self, params: dict[str, Any]) -> list[int]:
        """None: GLAD changes the token count, so block outputs no longer match the teacher's shape."""
        return []
