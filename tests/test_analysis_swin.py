"""Attention analysis of Swin: window maps with relative position bias and shift masks, CLI output."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
from timm.models._hub import save_for_hf

from tests.conftest import tiny_swin, write_images
from vitshrink.analysis import (
    AttentionAnalysis,
    analyze_attention,
    mean_attention,
    swin_attention_blocks,
    vit_attention_blocks,
    window_attention_maps,
)
from vitshrink.cli import main
from vitshrink.errors import VitshrinkError


def sharp_swin() -> torch.nn.Module:
    """14x14 patches, 7x7 windows: stage 0 has 4 windows (block 1 shifted, masked), stage 1 one window."""
    model = tiny_swin()
    with torch.no_grad():  # image-dependent maps and a visible relative position bias, as after training
        for _, attn in swin_attention_blocks(model).values():
            attn.qkv.weight.mul_(5.0)
            attn.relative_position_bias_table.normal_(0.0, 0.5)
    return model.eval()


def _block_inputs(
    model: torch.nn.Module, images: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Block index -> (attention input, shift mask) from one forward pass."""
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    handles = []
    for i, (_, attn) in swin_attention_blocks(model).items():

        def hook(m: torch.nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            inputs[i] = (args[0], kwargs.get("mask"))

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return inputs


def test_shapes_ranges_json_and_plot(tmp_path: Path) -> None:
    model = sharp_swin()
    analysis = analyze_attention(model, torch.randn(8, 3, 56, 56), batch_size=3, rank_images=2)
    assert isinstance(analysis, AttentionAnalysis) and analysis.windowed
    assert analysis.depth == 4 and analysis.num_tokens == 49 and analysis.num_prefix_tokens == 0
    assert [s.stage for s in analysis.layers] == [0, 0, 1, 1]
    assert [s.num_windows for s in analysis.layers] == [4, 4, 1, 1]
    assert [s.num_heads for s in analysis.layers] == [2, 2, 4, 4]
    for stats in analysis.layers:
        assert stats.num_tokens == 49
        assert stats.mean_attention is not None and stats.mean_attention.shape == (stats.num_heads, 49, 49)
        torch.testing.assert_close(stats.mean_attention.sum(-1), torch.ones(stats.num_heads, 49))
        assert 0.0 <= stats.similarity <= 1.0 and len(stats.similarity_per_head) == stats.num_heads
        assert 1.0 <= stats.effective_rank <= 49.0 and 0.0 < stats.effective_rank_fraction <= 1.0
    assert analysis.suggest_layers() == {"dgssa": [], "glad": []}
    data = analysis.to_json()
    assert data["attention"] == "window" and "mean_attention" not in json.dumps(data)
    assert data["layers"][1]["stage"] == 0 and data["layers"][1]["num_windows"] == 4
    analysis.save(tmp_path, chosen={})
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert len(saved["layers"]) == 4 and saved["suggested"] == {"dgssa": [], "glad": []}
    assert (tmp_path / "analysis.png").stat().st_size > 1000


def test_maps_match_the_model_including_bias_and_shift_mask() -> None:
    model = sharp_swin()
    image = torch.randn(1, 3, 56, 56)
    # what the model computes (unfused path): the softmax output of every block
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, (_, attn) in swin_attention_blocks(model).items():
        attn.fused_attn = False
        handles.append(attn.softmax.register_forward_hook(lambda m, a, out, i=i: captured.setdefault(i, out)))
    inputs = _block_inputs(model, image)
    for handle in handles:
        handle.remove()
    shifted = model.layers[0].blocks[1]
    x, mask = inputs[1]
    assert mask is not None and mask.shape == (4, 49, 49)  # the shifted block is masked
    with torch.no_grad():
        torch.testing.assert_close(
            window_attention_maps(shifted.attn, x, mask), captured[1], atol=1e-5, rtol=1e-4
        )
        unmasked = window_attention_maps(shifted.attn, x, None)
    assert (unmasked - captured[1]).abs().max() > 1e-2  # so the mask really is applied

    # identical images: similarity 1, and the mean map is the model's map averaged over windows
    analysis = analyze_attention(model, image.repeat(8, 1, 1, 1), rank_images=1)
    assert all(s.similarity == pytest.approx(1.0, abs=1e-6) for s in analysis.layers)
    for i, stats in enumerate(analysis.layers):
        torch.testing.assert_close(stats.mean_attention, captured[i].mean(0), atol=1e-5, rtol=1e-4)
    means = mean_attention(model, image, [1, 3])
    torch.testing.assert_close(means[1], captured[1].mean(0), atol=1e-5, rtol=1e-4)
    assert set(means) == {1, 3}


def test_statistics_follow_their_definition() -> None:
    """similarity = sum_w ||M_w - U_w||^2 / mean_i sum_w ||A_iw - U_w||^2, U_w = softmax(mask_w)."""
    model = sharp_swin()
    images = torch.randn(8, 3, 56, 56)
    analysis = analyze_attention(model, images, batch_size=3, rank_images=3)
    inputs = _block_inputs(model, images)
    for i, stats in enumerate(analysis.layers):
        x, mask = inputs[i]
        with torch.no_grad():
            maps = window_attention_maps(swin_attention_blocks(model)[i][1], x, mask).double()
        maps = maps.view(8, -1, *maps.shape[1:])  # (images, windows, heads, N, N)
        uniform = mask.double().softmax(-1)[:, None] if mask is not None else 1.0 / 49
        common = ((maps.mean(0) - uniform) ** 2).sum((-2, -1)).sum(0)
        total = ((maps - uniform) ** 2).sum((-2, -1)).sum(1).mean(0)
        assert stats.similarity_per_head == pytest.approx((common / total).tolist(), abs=1e-5)
        sv = torch.linalg.svdvals(maps[:3])
        prob = sv / sv.sum(-1, keepdim=True)
        ranks = torch.exp(-(prob * prob.clamp_min(1e-30).log()).sum(-1)).mean((0, 1))
        assert stats.effective_rank_per_head == pytest.approx(ranks.tolist(), rel=1e-4)
    assert analysis.layers[1].similarity < 0.99  # the shift mask is not counted as shared structure


def test_random_images_differ_and_dct_rewrite_at_keep_1_is_transparent() -> None:
    from vitshrink.methods import get_method

    model = sharp_swin()
    images = torch.randn(8, 3, 56, 56)
    base = analyze_attention(model, images, rank_images=2)
    assert all(s.similarity < 1.0 - 1e-4 for s in base.layers)
    rewritten = copy.deepcopy(model)
    method = get_method("dct")
    method.apply(rewritten, method.resolve(rewritten, {"keep": 1.0}, None), None)
    after = analyze_attention(rewritten, images, rank_images=2)
    for a, b in zip(base.layers, after.layers, strict=True):
        assert b.similarity == pytest.approx(a.similarity, abs=1e-4)
        assert b.effective_rank == pytest.approx(a.effective_rank, rel=1e-4)
    truncated = copy.deepcopy(model)
    method.apply(truncated, method.resolve(truncated, {"keep": 0.5}, None), None)
    assert analyze_attention(truncated, images, rank_images=1).depth == 4


def test_dgssa_helpers_and_other_swins_are_refused_clearly() -> None:
    model = sharp_swin()
    with pytest.raises(VitshrinkError, match="ViT/DeiT only"):
        vit_attention_blocks(model, "dgssa")
    with pytest.raises(VitshrinkError, match="block 9 is out of range"):
        mean_attention(model, torch.randn(1, 3, 56, 56), [9])
    torch.manual_seed(0)
    v2 = timm.create_model(
        "swinv2_tiny_window8_256",
        pretrained=False,
        img_size=32,
        window_size=4,
        embed_dim=24,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=10,
    )
    with pytest.raises(VitshrinkError, match="not timm's SwinTransformer"):
        analyze_attention(v2, torch.randn(8, 3, 32, 32))


def test_cli_analyze_swin_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_for_hf(sharp_swin(), tmp_path / "swin", safe_serialization=True)
    write_images(tmp_path / "images", 8, size=64)
    out_dir = tmp_path / "analysis"
    try:
        main(
            [
                "analyze",
                str(tmp_path / "swin"),
                "--calib",
                str(tmp_path / "images"),
                "-n",
                "8",
                "-q",
                "--output",
                str(out_dir),
            ]
        )
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((out_dir / "analysis.json").read_text())
    assert data["attention"] == "window" and data["num_images"] == 8
    assert [layer["stage"] for layer in data["layers"]] == [0, 0, 1, 1]
    assert data["suggested"] == {"dgssa": [], "glad": []}
    assert (out_dir / "analysis.png").stat().st_size > 1000
