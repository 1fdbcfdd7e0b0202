"""Per-layer attention statistics of a ViT/DeiT or Swin on calibration images.

For every transformer block, a forward pre-hook on ``block.attn`` captures the attention input and
recomputes the attention maps ``softmax(q k^T * scale)`` per head (N x N, prefix tokens included), so
fused (SDPA) attention is analysed too. Two statistics guide the compression methods:

* **similarity** (DGSSA: is this layer's attention the same for every image?). Per head, with ``A_i``
  the map of image ``i``, ``M`` their mean and ``U`` the uniform map (all entries ``1/N``)::

      similarity = ||M - U||^2 / mean_i ||A_i - U||^2  =  1 - mean_i ||A_i - M||^2 / mean_i ||A_i - U||^2

  i.e. the share of the maps' deviation from plain uniform mixing that is common to all images
  (one minus the normalised variance across images), averaged over heads, in [0, 1]. 1: every image
  has the same map; 0: the maps vary around a uniform mean. A head whose maps are all exactly
  uniform counts as 1 (identical).
* **effective rank** (GLAD: how many tokens does this layer's attention really use?): the
  entropy-based effective rank of Roy & Vetterli (2007), ``exp(H(p))`` with ``p`` the singular values
  of one attention map normalised to sum to 1, averaged over heads and images (the first
  ``rank_images`` images, since SVDs are the costly part), also given as a fraction of N.

The mean attention map of every layer is kept in memory (``LayerStats.mean_attention``) to
initialise DGSSA; it is not written to ``analysis.json``.

**Swin** (timm ``SwinTransformer``): every block's ``WindowAttention`` is hooked the same way; its maps
are ``softmax(q k^T * scale + B + mask)`` per window and head (``W*W x W*W``, ``B`` the relative
position bias). The shift mask of shifted blocks is *applied*, so the maps are exactly those the model
computes (windows straddling the cyclic-shift border attend within their sub-regions only). A window
position ``w`` of a block sees the same image region in every image; with ``M_w`` the mean over images
of window ``w``'s maps::

      similarity = sum_w ||M_w - U_w||^2 / mean_i sum_w ||A_iw - U_w||^2

per head, then averaged over heads: the ViT definition applied to the block-diagonal map of all
windows (one window gives exactly the ViT formula). ``U_w`` is the map with all logits zero: uniform
``1/(W*W)``, or in a masked window uniform over the tokens each query may attend to, so the mask is
not counted as structure shared by the images; the relative position bias is (it is the same for
every image, like the position embedding's effect in a ViT). The effective rank is averaged over
heads, windows and images and given as a fraction of ``W*W``. ``layers`` lists the blocks of all
stages in order (``LayerStats.stage``: the stage, ``num_windows``: windows per image);
``mean_attention`` is averaged over windows and images. ``suggest_layers`` returns empty lists for
Swin: dgssa and glad need a global token sequence.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitshrink.errors import VitshrinkError

MIN_IMAGES = 8
"""Fewest calibration images :func:`analyze_attention` accepts."""


@dataclass
class LayerStats:
    """Attention statistics of one transformer block."""

    index: int
    num_tokens: int
    num_heads: int
    similarity: float
    similarity_per_head: list[float]
    effective_rank: float
    effective_rank_per_head: list[float]
    mean_attention: torch.Tensor | None = field(default=None, repr=False)
    """(heads, N, N) attention averaged over the calibration images (float32, CPU)."""
    stage: int | None = None
    """Swin: the stage this block belongs to (None for ViT/DeiT)."""
    num_windows: int | None = None
    """Swin: attention windows per image in this block, N being the window area (None for ViT/DeiT)."""

    @property
    def effective_rank_fraction(self) -> float:
        return self.effective_rank / self.num_tokens

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"index": self.index}
        if self.stage is not None:
            data["stage"] = self.stage
        if self.num_windows is not None:
            data["num_windows"] = self.num_windows
        data.update(
            {
                "num_tokens": self.num_tokens,
                "num_heads": self.num_heads,
                "similarity": round(self.similarity, 6),
                "similarity_per_head": [round(v, 6) for v in self.similarity_per_head],
                "effective_rank": round(self.effective_rank, 4),
                "effective_rank_fraction": round(self.effective_rank_fraction, 6),
                "effective_rank_per_head": [round(v, 4) for v in self.effective_rank_per_head],
            }
        )
        return data


@dataclass
class AttentionAnalysis:
    """Per-layer attention statistics of a model on calibration images."""

    layers: list[LayerStats]
    num_images: int
    rank_images: int
    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int] | None
    attention: str = "global"
    """'global' (ViT/DeiT: one token sequence) or 'window' (Swin: N is a window's area)."""

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def windowed(self) -> bool:
        return self.attention == "window"

    def suggest_layers(
        self,
        similarity_threshold: float = 0.8,
        max_dgssa_fraction: float = 1 / 3,
        glad_ratio: float = 0.5,
        glad_stages: int = 2,
        glad_start_fraction: float = 0.5,
    ) -> dict[str, list[int]]:
        """Blocks for ``dgssa`` and ``glad`` (the ``auto`` policy).

        * dgssa: among the first ``max(1, round(depth * max_dgssa_fraction))`` blocks, the run of
          consecutive blocks that starts at the first block with ``similarity >= similarity_threshold``
          and continues while the similarity stays at or above the threshold.
        * glad: stage ``s`` (1, 2, ... up to ``glad_stages``) goes before the first block, at or after
          ``depth * glad_start_fraction``, after the last dgssa block and after the previous stage,
          whose effective-rank fraction is at most ``glad_ratio ** s``: that attention already uses
          no more independent directions than the ``glad_ratio ** s`` share of patch tokens left
          after the stage.

        Either list may be empty when no block qualifies; both are empty for windowed (Swin)
        attention, which neither method supports.
        """
        if self.windowed:
            return {"dgssa": [], "glad": []}
        depth = self.depth
        cap = min(depth, max(1, round(depth * max_dgssa_fraction)))
        dgssa: list[int] = []
        for stats in self.layers[:cap]:
            if stats.similarity >= similarity_threshold:
                dgssa.append(stats.index)
            elif dgssa:
                break
        glad: list[int] = []
        start = max(math.ceil(depth * glad_start_fraction), (dgssa[-1] + 1) if dgssa else 0, 1)
        for stats in self.layers[start:]:
            if len(glad) >= glad_stages:
                break
            if stats.effective_rank_fraction <= glad_ratio ** (len(glad) + 1):
                glad.append(stats.index)
        return {"dgssa": dgssa, "glad": glad}

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable statistics (no attention maps)."""
        data: dict[str, Any] = {
            "num_images": self.num_images,
            "rank_images": self.rank_images,
            "num_tokens": self.num_tokens,
            "num_prefix_tokens": self.num_prefix_tokens,
            "grid": list(self.grid) if self.grid else None,
            "similarity": "||M-U||^2 / mean_i ||A_i-U||^2 per head, averaged over heads "
            "(A_i: image i's attention map, M: mean map, U: uniform map)",
            "effective_rank": "Roy & Vetterli 2007 entropy effective rank, mean over heads and images",
        }
        if self.windowed:
            data["attention"] = "window"
            data["num_tokens"] = "per layer: the window area W*W"
            data["similarity"] = (
                "sum_w ||M_w-U||^2 / mean_i sum_w ||A_iw-U||^2 per head, averaged over heads "
                "(A_iw: image i's map in window w with relative position bias and shift mask, "
                "M_w: mean over images, U: uniform over the tokens each query may attend to)"
            )
            data["effective_rank"] = (
                "Roy & Vetterli 2007 entropy effective rank, mean over heads, windows and images; "
                "fraction of W*W"
            )
        data["layers"] = [stats.to_json() for stats in self.layers]
        data["suggested"] = self.suggest_layers()
        return data

    def save(self, directory: str | Path, chosen: dict[str, list[int]] | None = None) -> None:
        """Write ``analysis.json`` and ``analysis.png`` into ``directory``.

        ``chosen`` maps a method name (``dgssa``, ``glad``) to the blocks it was applied to; they
        are marked on the plot and recorded in the JSON.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        if chosen:
            data["chosen"] = {name: list(layers) for name, layers in chosen.items()}
        (directory / "analysis.json").write_text(json.dumps(data, indent=2) + "\n")
        self.plot(directory / "analysis.png", chosen)

    def plot(self, path: str | Path, chosen: dict[str, list[int]] | None = None) -> None:
        """Per-layer similarity and effective-rank fraction, chosen layers marked (Agg, no pyplot)."""
        from matplotlib.figure import Figure

        idx = [s.index for s in self.layers]
        fig = Figure(figsize=(max(5.0, 0.45 * len(idx) + 2.0), 3.6), dpi=120)
        ax = fig.subplots()
        ax.plot(idx, [s.similarity for s in self.layers], "o-", label="similarity across images")
        rank_label = "effective rank / window area" if self.windowed else "effective rank / N"
        ax.plot(idx, [s.effective_rank_fraction for s in self.layers], "s-", label=rank_label)
        for prev, stats in zip(self.layers[:-1], self.layers[1:], strict=True):
            if stats.stage is not None and stats.stage != prev.stage:
                ax.axvline(stats.index - 0.5, color="gray", linestyle=":", linewidth=1)
        colors = {"dgssa": "tab:green", "glad": "tab:red"}
        for name, layers in (chosen or {}).items():
            for n, layer in enumerate(layers):
                ax.axvspan(
                    layer - 0.4,
                    layer + 0.4,
                    color=colors.get(name, "tab:gray"),
                    alpha=0.15,
                    label=name if n == 0 else None,
                )
        ax.set_xlabel("block")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(idx)
        if self.windowed:
            areas = sorted({s.num_tokens for s in self.layers})
            where = f"windows of {'/'.join(str(a) for a in areas)} tokens, stages dotted"
        else:
            where = f"N={self.num_tokens}"
        ax.set_title(f"Attention statistics ({self.num_images} images, {where})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)


def _is_swin(model: nn.Module) -> bool:
    return "swin" in type(model).__name__.lower()


def vit_attention_blocks(
    model: nn.Module, what: str = "attention analysis", layers: list[int] | None = None
) -> dict[int, nn.Module]:
    """Block index -> timm ``Attention`` of the given blocks (default: all), or a clear error.

    Only timm's plain ``Attention`` qualifies (exact type: subclasses rewritten by other methods
    change the q/k/v layout).
    """
    from timm.layers import Attention

    from vitshrink.methods.base import vit_blocks

    if _is_swin(model):
        raise VitshrinkError(
            f"{what} supports ViT/DeiT only for now: {type(model).__name__} uses windowed attention "
            "with no global token sequence; pick a ViT/DeiT model."
        )
    blocks = vit_blocks(model)
    attns: dict[int, nn.Module] = {}
    for i in range(len(blocks)) if layers is None else layers:
        attn = getattr(unwrap_block(blocks[i]), "attn", None)
        if type(attn) is not Attention:
            raise VitshrinkError(
                f"{what}: block {i} of {type(model).__name__} has attention "
                f"{type(attn).__name__}, not timm's plain Attention; only ViT/DeiT-style blocks that no "
                "other method has rewritten are supported."
            )
        attns[i] = attn
    return attns


def unwrap_block(block: nn.Module) -> nn.Module:
    """The original timm block inside wrappers that keep it as ``.block`` (e.g. a GLAD stage)."""
    while not hasattr(block, "attn") and isinstance(getattr(block, "block", None), nn.Module):
        block = block.block
    return block


def swin_attention_blocks(
    model: nn.Module, what: str = "attention analysis"
) -> dict[int, tuple[int, nn.Module]]:
    """Block index (counted across stages) -> (stage, ``WindowAttention``) of a timm Swin, or a clear error."""
    from timm.models.swin_transformer import SwinTransformer, WindowAttention

    if not isinstance(model, SwinTransformer):
        raise VitshrinkError(
            f"{what}: {type(model).__name__} is not timm's SwinTransformer; windowed attention is supported "
            "for Swin (v1) models such as swin_tiny_patch4_window7_224."
        )
    attns: dict[int, tuple[int, nn.Module]] = {}
    for stage_index, stage in enumerate(model.layers):
        for block in stage.blocks:
            attn = getattr(block, "attn", None)
            if not isinstance(attn, WindowAttention):
                raise VitshrinkError(
                    f"{what}: block {len(attns)} of {type(model).__name__} has attention "
                    f"{type(attn).__name__}, not timm's WindowAttention."
                )
            attns[len(attns)] = (stage_index, attn)
    return attns


def window_attention_maps(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + rel_pos_bias + mask)`` of a Swin ``WindowAttention``: (B*nW, heads, N, N), fp32.

    ``x`` is the attention input (B*nW, N, C) and ``mask`` the shift mask (nW, N, N) or None, as the
    Swin block passes them. A truncated ``DCTWindowAttention`` is handled through its input basis.
    """
    windows, tokens, _ = x.shape
    heads = attn.num_heads
    to_basis = getattr(attn, "_to_basis", None)
    x_in = to_basis(x) if callable(to_basis) else x
    qkv = attn.qkv(x_in).float().reshape(windows, tokens, 3, heads, -1)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias().float()
    if mask is not None:
        num_win = mask.shape[0]
        logits = logits.view(-1, num_win, heads, tokens, tokens) + mask.float()[None, :, None]
        logits = logits.view(-1, heads, tokens, tokens)
    return logits.softmax(dim=-1)


def attention_maps(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T * scale)`` of a timm ``Attention`` for its input ``x``: (B, heads, N, N), fp32."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).float().reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def effective_rank(maps: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli (2007) effective rank of each matrix in ``maps`` (..., N, N)."""
    sv = torch.linalg.svdvals(maps.float())
    p = sv / sv.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return entropy.exp()


class _LayerAccumulator:
    """Running sums for one block; maps arrive as (B, windows, H, N, N) (one window for ViT/DeiT)."""

    def __init__(self) -> None:
        self.uniform: torch.Tensor | float | None = None  # U: 1/N, or (W, 1, N, N) for masked windows
        self.sum: torch.Tensor | None = None  # (W, H, N, N) float64
        self.dev_u: torch.Tensor | None = None  # (H,) float64: sum_i sum_w ||A_iw - U||^2
        self.count = 0
        self.rank_sum: torch.Tensor | None = None  # (H,) float64
        self.rank_count = 0

    def add(self, maps: torch.Tensor, rank_left: int, uniform: torch.Tensor | None = None) -> None:
        """Add a batch of maps; ``uniform`` (W, N, N) replaces 1/N as U where windows are masked."""
        maps = maps.detach()
        if self.uniform is None:
            self.uniform = 1.0 / maps.shape[-1] if uniform is None else uniform.detach().float()[:, None]
        batch_sum = maps.sum(dim=0).double()  # per-batch sums in fp32, running sums in fp64
        batch_dev = ((maps - self.uniform) ** 2).sum(dim=(-2, -1)).double().sum(dim=(0, 1))
        if self.sum is None or self.dev_u is None:
            self.sum, self.dev_u = batch_sum, batch_dev
        else:
            self.sum += batch_sum
            self.dev_u += batch_dev
        self.count += maps.shape[0]
        if rank_left > 0:
            ranked = maps[:rank_left]
            ranks = effective_rank(ranked).double().sum(dim=(0, 1))
            self.rank_sum = ranks if self.rank_sum is None else self.rank_sum + ranks
            self.rank_count += ranked.shape[0] * ranked.shape[1]

    def mean(self) -> torch.Tensor:
        """(H, N, N) mean map over images and windows (float32, CPU)."""
        assert self.sum is not None
        return (self.sum / self.count).mean(dim=0).float().cpu()

    def finish(self, index: int, stage: int | None = None) -> LayerStats:
        """The block's statistics; ``stage`` given (Swin) also records the windows per image."""
        assert self.sum is not None and self.dev_u is not None and self.rank_sum is not None
        assert self.uniform is not None
        mean = self.sum / self.count
        windows, heads, tokens, _ = mean.shape
        uniform = self.uniform.double() if isinstance(self.uniform, torch.Tensor) else self.uniform
        common = ((mean - uniform) ** 2).sum(dim=(-2, -1)).sum(dim=0)
        total = self.dev_u / self.count
        sim = torch.where(total > 1e-12, common / total.clamp_min(1e-30), torch.ones_like(total))
        sim = sim.clamp(0.0, 1.0)
        ranks = self.rank_sum / self.rank_count
        return LayerStats(
            index=index,
            num_tokens=tokens,
            num_heads=heads,
            similarity=float(sim.mean()),
            similarity_per_head=[float(v) for v in sim],
            effective_rank=float(ranks.mean()),
            effective_rank_per_head=[float(v) for v in ranks],
            mean_attention=mean.mean(dim=0).float().cpu(),
            stage=stage,
            num_windows=windows if stage is not None else None,
        )


def _batches(images: torch.Tensor, batch_size: int, progress: bool, label: str) -> Any:
    starts = range(0, len(images), batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description=label, transient=True)
    for start in starts:
        yield images[start : start + batch_size]


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


def _hooked_attentions(model: nn.Module, what: str, layers: list[int] | None) -> dict[int, nn.Module]:
    """Block index -> attention module to hook: timm ``Attention`` (ViT/DeiT) or ``WindowAttention`` (Swin)."""
    if not _is_swin(model):
        return vit_attention_blocks(model, what, layers)
    blocks = swin_attention_blocks(model, what)
    chosen = list(blocks) if layers is None else layers
    bad = [i for i in chosen if i not in blocks]
    if bad:
        raise VitshrinkError(
            f"{what}: block {bad[0]} is out of range; this model has blocks 0-{len(blocks) - 1}."
        )
    return {i: blocks[i][1] for i in chosen}


@torch.no_grad()
def _run_with_attention_hooks(
    model: nn.Module,
    images: torch.Tensor,
    layers: list[int],
    batch_size: int,
    rank_images: int,
    progress: bool,
    what: str,
) -> dict[int, _LayerAccumulator]:
    attns = _hooked_attentions(model, what, layers)
    windowed = _is_swin(model)
    accs = {i: _LayerAccumulator() for i in layers}
    state = {"rank_left": 0, "batch": 1}
    handles = []

    def make_hook(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            uniform = None
            if windowed:
                mask = args[1] if len(args) > 1 else kwargs.get("mask")
                maps = window_attention_maps(module, args[0], mask)
                maps = maps.view(state["batch"], -1, *maps.shape[1:])
                if mask is not None:  # U for a masked window: uniform over the tokens it may attend to
                    uniform = mask.float().softmax(dim=-1)
            else:
                maps = attention_maps(module, args[0]).unsqueeze(1)
            accs[i].add(maps, state["rank_left"], uniform)

        return hook

    for i in layers:
        handles.append(attns[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device, dtype = _model_device_dtype(model)
    rank_left = rank_images
    try:
        for batch in _batches(images, batch_size, progress, "Analysing attention"):
            state["rank_left"] = rank_left
            state["batch"] = len(batch)
            model(batch.to(device=device, dtype=dtype))
            rank_left -= len(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return accs


def analyze_attention(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 32,
    progress: bool = False,
    rank_images: int = 16,
) -> AttentionAnalysis:
    """Per-layer attention statistics of a ViT/DeiT or Swin ``model`` on ``images`` (n, C, H, W), n >= 8.

    ``rank_images`` caps how many images the (costly) effective-rank SVDs use. See the module
    docstring for the definitions (and for Swin's windows).
    """
    windowed = _is_swin(model)
    stages = {i: stage for i, (stage, _) in swin_attention_blocks(model).items()} if windowed else {}
    attns = _hooked_attentions(model, "attention analysis", None)
    if images.ndim != 4:
        raise VitshrinkError(
            f"Calibration images must be a batch (n, C, H, W); got a tensor of shape {tuple(images.shape)}."
        )
    if len(images) < MIN_IMAGES:
        raise VitshrinkError(
            f"Attention analysis needs at least {MIN_IMAGES} calibration images, got {len(images)}: "
            "use a larger calibration set."
        )
    if batch_size < 1:
        raise VitshrinkError(f"batch_size must be at least 1, got {batch_size}.")
    accs = _run_with_attention_hooks(
        model,
        images,
        list(range(len(attns))),
        batch_size,
        max(1, rank_images),
        progress,
        "attention analysis",
    )
    layers = [accs[i].finish(i, stages.get(i)) for i in range(len(attns))]
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return AttentionAnalysis(
        layers=layers,
        num_images=len(images),
        rank_images=min(max(1, rank_images), len(images)),
        num_tokens=layers[0].num_tokens,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        grid=(int(grid[0]), int(grid[1])) if grid is not None else None,
        attention="window" if windowed else "global",
    )


def mean_attention(
    model: nn.Module, images: torch.Tensor, layers: list[int], batch_size: int = 32
) -> dict[int, torch.Tensor]:
    """(heads, N, N) attention of the given blocks averaged over ``images`` (and Swin's windows)."""
    if len(images) < 1:
        raise VitshrinkError("No calibration images: give at least one image.")
    accs = _run_with_attention_hooks(model, images, layers, batch_size, 0, False, "mean attention")
    return {i: acc.mean() for i, acc in accs.items()}
