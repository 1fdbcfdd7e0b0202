"""Attention analysis: shapes, ranges, errors and the 'auto' layer policy."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from tests.conftest import tiny_vit as conftest_vit
from vitshrink.analysis import (
    AttentionAnalysis,
    LayerStats,
    analyze_attention,
    effective_rank,
    mean_attention,
    vit_attention_blocks,
)
from vitshrink.errors import VitshrinkError


def tiny_vit(**kwargs: object) -> torch.nn.Module:
    return conftest_vit(**{"patch_size": 4, "embed_dim": 48, "depth": 3, "num_heads": 3, **kwargs})


def test_shapes_ranges_and_save(tmp_path) -> None:
    model = tiny_vit()
    images = torch.randn(10, 3, 32, 32)
    analysis = analyze_attention(model, images, batch_size=4, rank_images=4)
    assert analysis.depth == 3 and analysis.num_tokens == 65
    assert analysis.num_prefix_tokens == 1 and analysis.grid == (8, 8)
    for stats in analysis.layers:
        assert stats.mean_attention is not None
        assert stats.mean_attention.shape == (3, 65, 65)
        torch.testing.assert_close(stats.mean_attention.sum(-1), torch.ones(3, 65))
        assert 0.0 <= stats.similarity <= 1.0
        assert len(stats.similarity_per_head) == 3
        assert 1.0 <= stats.effective_rank <= 65.0
        assert 0.0 < stats.effective_rank_fraction <= 1.0
    data = analysis.to_json()
    json.dumps(data)
    assert "mean_attention" not in json.dumps(data)
    analysis.save(tmp_path, chosen={"dgssa": [0], "glad": [2]})
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["chosen"] == {"dgssa": [0], "glad": [2]}
    assert len(saved["layers"]) == 3
    assert (tmp_path / "analysis.png").stat().st_size > 1000


def test_identical_images_are_fully_similar_and_match_model_attention() -> None:
    model = tiny_vit()
    image = torch.randn(1, 3, 32, 32)
    analysis = analyze_attention(model, image.repeat(8, 1, 1, 1), rank_images=1)
    assert all(s.similarity == pytest.approx(1.0, abs=1e-6) for s in analysis.layers)
    # the mean map equals the attention the model computes (unfused path) for that image
    captured = {}
    attn = model.blocks[1].attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.setdefault("a", out))
    model(image)
    handle.remove()
    torch.testing.assert_close(analysis.layers[1].mean_attention, captured["a"][0], atol=1e-5, rtol=1e-4)
    means = mean_attention(model, image, [1])
    torch.testing.assert_close(means[1], captured["a"][0], atol=1e-5, rtol=1e-4)


def test_too_few_images_is_a_clear_error() -> None:
    with pytest.raises(VitshrinkError, match="at least 8 calibration images, got 7"):
        analyze_attention(tiny_vit(), torch.randn(7, 3, 32, 32))


def test_no_class_token_and_distilled_models() -> None:
    avg = tiny_vit(class_token=False, global_pool="avg", depth=2)
    a = analyze_attention(avg, torch.randn(8, 3, 32, 32), rank_images=2)
    assert a.num_prefix_tokens == 0 and a.num_tokens == 64
    dist = conftest_vit("deit_tiny_distilled_patch16_224", patch_size=4, embed_dim=48, depth=2, num_heads=3)
    d = analyze_attention(dist, torch.randn(8, 3, 32, 32), rank_images=2)
    assert d.num_prefix_tokens == 2 and d.num_tokens == 66


def test_swin_is_rejected_clearly_by_vit_only_helpers() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                             window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=10)
    with pytest.raises(VitshrinkError, match="ViT/DeiT only"):
        vit_attention_blocks(swin, "dgssa")
    assert analyze_attention(swin, torch.randn(8, 3, 32, 32), rank_images=1).windowed  # see test_analysis_swin.py


def test_effective_rank_extremes() -> None:
    eye = torch.eye(10)
    ones = torch.full((10, 10), 0.1)
    ranks = effective_rank(torch.stack([eye, ones]))
    torch.testing.assert_close(ranks, torch.tensor([10.0, 1.0]), atol=1e-4, rtol=1e-4)


def _constructed(similarity: list[float], rank_fraction: list[float], tokens: int = 100) -> AttentionAnalysis:
    layers = [
        LayerStats(
            index=i,
            num_tokens=tokens,
            num_heads=1,
            similarity=s,
            similarity_per_head=[s],
            effective_rank=r * tokens,
            effective_rank_per_head=[r * tokens],
        )
        for i, (s, r) in enumerate(zip(similarity, rank_fraction, strict=True))
    ]
    return AttentionAnalysis(
        layers, num_images=8, rank_images=8, num_tokens=tokens, num_prefix_tokens=1, grid=None
    )


def test_suggest_layers_policy() -> None:
    sim = [0.5, 0.9, 0.95, 0.7, 0.99, 0.99, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    rank = [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.6, 0.45, 0.4, 0.3, 0.2, 0.1]
    got = _constructed(sim, rank).suggest_layers(similarity_threshold=0.8)
    # dgssa: the run starting at block 1 (first above threshold), stopping at block 3; capped at depth/3
    assert got["dgssa"] == [1, 2]
    # glad stage 1: first block >= 6 with rank fraction <= 0.5 (block 7); stage 2: <= 0.25 (block 10)
    assert got["glad"] == [7, 10]
    none = _constructed([0.1] * 6, [0.9] * 6).suggest_layers()
    assert none == {"dgssa": [], "glad": []}
    one_stage = _constructed(sim, rank).suggest_layers(glad_stages=1)
    assert one_stage["glad"] == [7]
