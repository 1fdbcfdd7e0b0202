"""Token merging (ToMe) baseline on tiny random timm ViTs."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny_swin, tiny_vit, with_method
from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import get_method
from vitshrink.methods.tome import ToMeBlock, tome_schedule


def _vit(**kw: object) -> torch.nn.Module:
    return tiny_vit(**{"patch_size": 4, "embed_dim": 48, "depth": 6, "num_heads": 3, **kw})


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return _vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def _tome(model: torch.nn.Module, **knobs: object) -> tuple[torch.nn.Module, dict]:
    return with_method(model, "tome", **knobs)


def _token_counts(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    counts: list[int] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: counts.append(out.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


def test_r0_is_exact(vit: torch.nn.Module, images: torch.Tensor) -> None:
    model, params = _tome(vit, r=0)
    assert params == {"r": 0, "prop_attn": True}
    assert all(type(b) is ToMeBlock for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(images), vit(images))


@pytest.mark.parametrize("fused", [True, False])
def test_token_counts_and_closeness(vit: torch.nn.Module, images: torch.Tensor, fused: bool) -> None:
    model, _ = _tome(vit, r=4)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    assert _token_counts(model, images) == [65 - 4 * (i + 1) for i in range(6)]
    with torch.no_grad():
        ref, out = vit(images), model(images)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_fraction_and_list_schedules(vit: torch.nn.Module, images: torch.Tensor) -> None:
    model, params = _tome(vit, r=0.1)
    assert params["r"] == 0.1
    assert _token_counts(model, images) == [59, 54, 49, 45, 41, 37]
    model, _ = _tome(vit, r=[8, 4, 2, 1, 0, 0])
    assert _token_counts(model, images) == [57, 53, 51, 50, 50, 50]
    assert tome_schedule(0.5, 64, 3) == [32, 16, 8]


def test_auto_and_prop_attn(vit: torch.nn.Module, images: torch.Tensor) -> None:
    _, params = _tome(vit)
    assert params["r"] == 3  # 8 for 196 tokens, scaled to 64
    with_prop, _ = _tome(vit, r=4)
    without, params = _tome(vit, r=4, prop_attn="false")
    assert params["prop_attn"] is False
    with torch.no_grad():
        assert not torch.allclose(with_prop(images), without(images))


def test_train_gradients_batch(vit: torch.nn.Module, images: torch.Tensor) -> None:
    model, _ = _tome(vit, r=4)
    model.train()
    out = model(images)
    assert out.shape == (3, 10)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # Batch elements merge independently: one image alone gives the same output as in the batch.
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(images)[1:2], model(images[1:2]), atol=1e-5)


def test_reload_path(vit: torch.nn.Module, images: torch.Tensor) -> None:
    model, params = _tome(vit, r=4)
    state = model.state_dict()
    assert set(state) == set(vit.state_dict())
    fresh = _vit()
    for p in fresh.parameters():  # different weights before loading
        torch.nn.init.normal_(p)
    get_method("tome").apply(fresh, params, None)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))


def test_errors(vit: torch.nn.Module) -> None:
    method = get_method("tome")
    with pytest.raises(VitshrinkError, match="too many tokens.*r <= 9"):
        method.resolve(copy.deepcopy(vit), {"r": 10}, None)
    with pytest.raises(VitshrinkError, match="between 0 and 1"):
        method.resolve(copy.deepcopy(vit), {"r": 1.5}, None)
    with pytest.raises(VitshrinkError, match="one per block"):
        method.resolve(copy.deepcopy(vit), {"r": [1, 2]}, None)
    with pytest.raises(VitshrinkError, match="unknown knob"):
        method.resolve(copy.deepcopy(vit), {"rr": 1}, None)
    model, params = _tome(vit, r=1)
    with pytest.raises(VitshrinkError, match="already applied"):
        method.apply(model, params, None)
    swin = tiny_swin()
    with pytest.raises(VitshrinkError, match="ViT"):
        method.check(swin)


def test_torch_export(vit: torch.nn.Module, images: torch.Tensor) -> None:
    model, _ = _tome(vit, r=4)
    exported = torch.export.export(model, (images,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(images), model(images), atol=1e-6)
