"""DGSSA: static attention reproduces static inputs, drops Q/K, reloads, exports and compiles."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_swin
from tests.conftest import tiny_vit as conftest_vit
from vitshrink.analysis import analyze_attention
from vitshrink.errors import VitshrinkError
from vitshrink.methods import CalibrationContext, get_method
from vitshrink.methods.dgssa import StaticAttention


def tiny_vit(**kwargs: object) -> torch.nn.Module:
    model = conftest_vit(**{"patch_size": 4, "embed_dim": 48, "num_heads": 3, **kwargs})
    with torch.no_grad():  # sharpen q and k so attention is far from uniform (random init is near it)
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * block.attn.attn_dim] *= 6.0
    return model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("with_analysis", [True, False])
def test_static_input_is_reproduced_exactly(with_analysis: bool) -> None:
    model = tiny_vit()
    original = copy.deepcopy(model)
    image = torch.randn(1, 3, 32, 32)
    images = image.repeat(8, 1, 1, 1)
    analysis = analyze_attention(model, images, rank_images=1) if with_analysis else None
    method = get_method("dgssa")
    params = method.resolve(model, {"layers": [0, 1, 2]}, analysis)
    method.apply(model, params, CalibrationContext(images=images, analysis=analysis, batch_size=4))
    assert all(isinstance(model.blocks[i].attn, StaticAttention) for i in (0, 1, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(image), original(image), atol=1e-5, rtol=1e-4)
    assert method.distill_layers(params) == [0, 1, 2]


def test_analysis_under_inference_mode_initialises() -> None:
    model = tiny_vit()
    images = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():  # as the pipeline runs it
        analysis = analyze_attention(model, images, rank_images=1)
    method = get_method("dgssa")
    with torch.no_grad():
        method.apply(
            model, method.resolve(model, {"layers": [0]}, analysis), CalibrationContext(images, analysis)
        )
    static = model.blocks[0].attn.static_attn
    torch.testing.assert_close(static.detach(), analysis.layers[0].mean_attention)
    model(images[:2]).sum().backward()  # trainable by the fine-tune
    assert static.grad is not None


def test_qk_parameters_are_removed() -> None:
    model = tiny_vit()
    before = n_params(model)
    method = get_method("dgssa")
    method.apply(model, method.resolve(model, {"layers": "0-1"}, None), None)
    dim, heads, tokens = 48, 3, 65
    removed = 2 * (2 * dim * dim + 2 * dim)  # q and k weights + biases, two layers
    added = 2 * heads * tokens * tokens
    assert n_params(model) == before - removed + added
    names = [n for n, _ in model.named_parameters()]
    assert "blocks.0.attn.v.weight" in names and "blocks.0.attn.static_attn" in names
    assert not any(n.startswith("blocks.0.attn.qkv") for n in names)
    assert "blocks.2.attn.qkv.weight" in names


def test_v_and_proj_are_kept_from_the_original() -> None:
    model = tiny_vit()
    qkv = model.blocks[0].attn.qkv.weight.detach().clone()
    proj = model.blocks[0].attn.proj.weight.detach().clone()
    method = get_method("dgssa")
    method.apply(model, method.resolve(model, {"layers": [0]}, None), None)
    torch.testing.assert_close(model.blocks[0].attn.v.weight, qkv[96:])
    torch.testing.assert_close(model.blocks[0].attn.proj.weight, proj)


def test_reload_path_gives_identical_outputs() -> None:
    images = torch.randn(8, 3, 32, 32)
    model = tiny_vit()
    method = get_method("dgssa")
    params = method.resolve(model, {}, None)
    assert params == {"layers": [0], "num_tokens": 65, "num_heads": 3, "layer_tokens": [65]}  # first quarter
    method.apply(model, params, CalibrationContext(images=images, batch_size=4))
    fresh = tiny_vit()
    torch.manual_seed(123)
    for p in fresh.parameters():  # make sure nothing is accidentally shared with the calibrated model
        p.data.normal_()
    method.apply(fresh, params, None)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images))


def test_auto_uses_analysis_suggestion() -> None:
    model = tiny_vit(depth=6)
    image = torch.randn(1, 3, 32, 32)
    analysis = analyze_attention(model, image.repeat(8, 1, 1, 1), rank_images=1)  # similarity 1
    params = get_method("dgssa").resolve(model, {}, analysis)
    assert params["layers"] == [0, 1]  # capped at the first third of 6 blocks


def test_distilled_and_no_class_token_models() -> None:
    for model in (
        tiny_vit(class_token=False, global_pool="avg", depth=2),
        conftest_vit("deit_tiny_distilled_patch16_224", patch_size=4, embed_dim=48, depth=2, num_heads=3),
    ):
        image = torch.randn(1, 3, 32, 32)
        reference = model(image)
        method = get_method("dgssa")
        params = method.resolve(model, {"layers": [0]}, None)
        method.apply(model, params, CalibrationContext(images=image.repeat(2, 1, 1, 1)))
        assert model.blocks[0].attn.num_tokens == model.num_prefix_tokens + 64
        torch.testing.assert_close(model(image), reference, atol=1e-5, rtol=1e-4)


def test_input_size_mismatch_is_a_clear_error() -> None:
    model = tiny_vit(dynamic_img_size=True, depth=2)
    method = get_method("dgssa")
    method.apply(model, method.resolve(model, {"layers": [0]}, None), None)
    model(torch.randn(1, 3, 32, 32))
    with pytest.raises(VitshrinkError, match="built for 65 tokens but got 101"):
        model(torch.randn(1, 3, 40, 40))
    other = tiny_vit(img_size=40, depth=2)
    with pytest.raises(VitshrinkError, match="built for 65 tokens but this model makes 101"):
        method.apply(other, {"layers": [0], "num_tokens": 65, "num_heads": 3}, None)


def test_bad_input_errors() -> None:
    model = tiny_vit()
    method = get_method("dgssa")
    with pytest.raises(VitshrinkError, match="block index 7 is out of range"):
        method.resolve(model, {"layers": [7]}, None)
    with pytest.raises(VitshrinkError, match="no knob 'heads'"):
        method.resolve(model, {"heads": 2}, None)
    swin = tiny_swin()
    with pytest.raises(VitshrinkError, match="ViT/DeiT only"):
        method.check(swin)


def test_export_and_compile_match_eager() -> None:
    images = torch.randn(8, 3, 32, 32)
    model = tiny_vit(depth=2)
    method = get_method("dgssa")
    method.apply(model, method.resolve(model, {"layers": [0]}, None), CalibrationContext(images=images))
    x = images[:2]
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected)
