"""GLAD: token reduction shapes, pooling init, composition with DGSSA, reload, export, errors."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_swin
from tests.conftest import tiny_vit as conftest_vit
from vitshrink.errors import VitshrinkError
from vitshrink.methods import CalibrationContext, get_method
from vitshrink.methods.dgssa import StaticAttention
from vitshrink.methods.glad import (
    GladStage,
    block_token_counts,
    fallback_layers,
    next_grid,
    pca_init,
    pool_matrix,
)


def tiny_vit(**kwargs: object) -> torch.nn.Module:
    return conftest_vit(**{"patch_size": 4, "embed_dim": 48, "depth": 6, "num_heads": 3, **kwargs})


def test_pool_matrix_and_grids() -> None:
    assert next_grid((14, 14), 98) == (14, 7)
    assert next_grid((14, 7), 49) == (7, 7)
    assert next_grid((8, 8), 7) == (7, 1)
    assert next_grid((8, 8), 11) is None  # no grid fits: 1-D pooling
    w = pool_matrix(196, 98, (14, 14), (14, 7))
    torch.testing.assert_close(w.sum(1), torch.ones(98, dtype=w.dtype))
    assert w[0, 0] == 0.5 and w[0, 1] == 0.5 and w[0, 2] == 0  # pairs of horizontal neighbours
    w2 = pool_matrix(64, 16, (8, 8), (4, 4))
    grid = torch.arange(64.0, dtype=torch.float64)
    # top-left 2x2 cell averages tokens 0, 1, 8, 9
    assert float(w2[0] @ grid) == pytest.approx((0 + 1 + 8 + 9) / 4)
    w1 = pool_matrix(10, 3, None, None)
    torch.testing.assert_close(w1.sum(1), torch.ones(3, dtype=w1.dtype))
    assert fallback_layers(12, 2) == [6, 9]
    assert fallback_layers(6, 2) == [3, 4]


def test_pca_init_keeps_a_pool_when_data_span_everything() -> None:
    pool = pool_matrix(16, 4, (4, 4), (2, 2))
    x = torch.randn(16, 400, dtype=torch.float64)
    w = pca_init(pool, x @ x.T)
    assert w.shape == (4, 16)
    assert torch.linalg.matrix_rank(w) == 4
    # data confined to a 4-dim token subspace: W reproduces pooling on that data exactly
    basis = torch.randn(16, 4, dtype=torch.float64)
    y = basis @ torch.randn(4, 300, dtype=torch.float64)
    torch.testing.assert_close(pca_init(pool, y @ y.T) @ y, pool @ y)


@pytest.mark.parametrize("init", ["pool", "pca"])
def test_tokens_drop_at_each_stage(init: str) -> None:
    model = tiny_vit()
    images = torch.randn(8, 3, 32, 32)
    method = get_method("glad")
    params = method.resolve(model, {"init": init}, None)
    assert params["layers"] == [3, 4] and params["tokens"] == [32, 16]
    method.apply(model, params, CalibrationContext(images=images, batch_size=4))
    assert isinstance(model.blocks[3], GladStage) and isinstance(model.blocks[4], GladStage)
    assert block_token_counts(model) == [65, 65, 65, 33, 17, 17]
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.shape[1]))
    with torch.no_grad():
        out = model(images)
        feats = model.forward_features(images)
    assert out.shape == (8, 10)
    assert feats.shape == (8, 17, 48)
    assert seen == {0: 65, 1: 65, 2: 65, 3: 33, 4: 17, 5: 17}
    assert torch.isfinite(out).all()
    assert method.distill_layers(params) == []
    names = dict(model.named_parameters())
    assert names["blocks.3.reduce.weight"].shape == (32, 64)
    assert names["blocks.3.reduce.bias"].shape == (32, 48)
    assert "blocks.3.block.attn.qkv.weight" in names


def test_explicit_tokens_and_prefix_passthrough() -> None:
    model = conftest_vit("deit_tiny_distilled_patch16_224", patch_size=4, embed_dim=48, depth=4, num_heads=3)
    method = get_method("glad")
    params = method.resolve(model, {"layers": "2", "tokens": "16", "bias": False}, None)
    method.apply(model, params, CalibrationContext(images=torch.randn(4, 3, 32, 32)))
    x = torch.randn(2, 66, 48)
    y = model.blocks[2].reduce(x)
    assert y.shape == (2, 18, 48)
    torch.testing.assert_close(y[:, :2], x[:, :2])  # class and distillation tokens unchanged
    torch.testing.assert_close(y[:, 2], x[:, 2:].reshape(2, 8, 8, 48)[:, :2, :2].mean(dim=(1, 2)))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    avg = tiny_vit(class_token=False, global_pool="avg", depth=2)
    params = method.resolve(avg, {"layers": [1], "ratio": 0.25}, None)
    assert params["tokens"] == [16]
    method.apply(avg, params, CalibrationContext(images=torch.randn(4, 3, 32, 32)))
    assert avg.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 16, 48)


def _compressed(images: torch.Tensor) -> tuple[torch.nn.Module, list[tuple[str, dict]]]:
    model = tiny_vit()
    ctx = CalibrationContext(images=images, batch_size=4)
    applied = []
    for name, knobs in (("dgssa", {"layers": [0, 1]}), ("glad", {"layers": [3, 5], "init": "pca"})):
        method = get_method(name)
        params = method.resolve(model, knobs, None)
        method.apply(model, params, ctx)
        applied.append((name, params))
    return model, applied


def test_composes_with_dgssa_and_reloads() -> None:
    images = torch.randn(8, 3, 32, 32)
    model, applied = _compressed(images)
    assert isinstance(model.blocks[0].attn, StaticAttention)
    assert isinstance(model.blocks[3], GladStage)
    with torch.no_grad():
        expected = model(images)
    fresh = tiny_vit()
    for name, params in applied:
        get_method(name).apply(fresh, params, None)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), expected)


def test_dgssa_after_glad_binds_to_the_reduced_token_count() -> None:
    model = tiny_vit()
    images = torch.randn(8, 3, 32, 32)
    ctx = CalibrationContext(images=images)
    glad, dgssa = get_method("glad"), get_method("dgssa")
    glad_params = glad.resolve(model, {"layers": [2], "tokens": [16]}, None)
    glad.apply(model, glad_params, ctx)
    params = dgssa.resolve(model, {"layers": [0, 2, 4]}, None)
    dgssa.apply(model, params, ctx)
    assert [model.blocks[0].attn.num_tokens, model.blocks[2].block.attn.num_tokens] == [65, 17]
    assert model.blocks[4].attn.static_attn.shape == (3, 17, 17)
    assert model(images).shape == (8, 10)
    assert params["layer_tokens"] == [65, 17, 17]
    assert dgssa.distill_layers(params) == [0]  # later outputs have fewer tokens than the teacher's
    # reloading in another order is a clear error, not a silent shape mismatch
    with pytest.raises(VitshrinkError, match="apply the methods in the order"):
        dgssa.apply(tiny_vit(), params, None)


def test_export_and_compile_match_eager() -> None:
    images = torch.randn(8, 3, 32, 32)
    model, _ = _compressed(images)
    x = images[:2]
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
        compiled = torch.compile(model, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected)


def test_errors() -> None:
    model = tiny_vit()
    method = get_method("glad")
    with pytest.raises(VitshrinkError, match="block index 6 is out of range"):
        method.resolve(model, {"layers": [2, 6]}, None)
    with pytest.raises(VitshrinkError, match="one token count per stage"):
        method.resolve(model, {"layers": [2, 4], "tokens": [32]}, None)
    with pytest.raises(VitshrinkError, match="keeps 40 tokens but receives 32"):
        method.resolve(model, {"layers": [2, 4], "tokens": [32, 40]}, None)
    with pytest.raises(VitshrinkError, match="init='svd' is unknown"):
        method.resolve(model, {"init": "svd"}, None)
    with pytest.raises(VitshrinkError, match="bias='maybe' must be true or false"):
        method.resolve(model, {"bias": "maybe"}, None)
    assert method.resolve(model, {"bias": "false"}, None)["bias"] is False
    with pytest.raises(VitshrinkError, match="ratio=1.5"):
        method.resolve(model, {"ratio": 1.5}, None)
    params = method.resolve(model, {"layers": [3]}, None)
    other = tiny_vit(img_size=40)
    with pytest.raises(VitshrinkError, match="built for 64 patch tokens but this model makes 100"):
        method.apply(other, params, None)
    method.apply(model, params, None)
    with pytest.raises(VitshrinkError, match="already applied"):
        method.resolve(model, {}, None)
    with pytest.raises(VitshrinkError, match="expects 65 tokens but got 10"):
        model.blocks[3](torch.randn(1, 10, 48))
    swin = tiny_swin()
    with pytest.raises(VitshrinkError, match="glad needs a global token sequence"):
        method.check(swin)
