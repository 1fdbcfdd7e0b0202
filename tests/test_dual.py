"""dual: Dual-ViT-style dual-pathway attention on tiny random timm ViTs (8x8 patch grid)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from tests.conftest import tiny_vit, with_method
from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import METHODS, get_method
from vitshrink.methods.dual import DualPathAttention, semantic_log_mass

# FlopCounterMode does not count the CPU SDPA kernel: count it with torch's own SDPA formula.
_FLOPS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = (
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    )


def _vit(**kw: object) -> torch.nn.Module:
    return tiny_vit(**{"patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3, **kw})


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return _vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def _dual(model: torch.nn.Module, **knobs: object) -> tuple[torch.nn.Module, dict]:
    return with_method(model, "dual", **knobs)


def _flops(model: torch.nn.Module) -> int:
    with FlopCounterMode(display=False, custom_mapping=_FLOPS) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops()


@pytest.mark.parametrize("tokens", [16, 4])
def test_shape_flops_and_structure(vit: torch.nn.Module, images: torch.Tensor, tokens: int) -> None:
    model, params = _dual(vit, tokens=tokens)
    assert params == {"layers": [2, 3], "tokens": tokens, "pool": "avg", "gate": True}
    assert [type(b.attn) is DualPathAttention for b in model.blocks] == [False, False, True, True]
    assert get_method("dual").distill_layers(params) == [2, 3]
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert _flops(model) < _flops(vit)
    # same keys as the original, plus one gate per rewritten block
    new_keys = set(model.state_dict()) - set(vit.state_dict())
    assert set(vit.state_dict()) <= set(model.state_dict())
    assert new_keys == {"blocks.2.attn.sem_gate", "blocks.3.attn.sem_gate"}


def test_all_layers_flops_drop_more(vit: torch.nn.Module) -> None:
    half, _ = _dual(vit, tokens=4)
    full, params = _dual(vit, tokens=4, layers="0-3", gate=False)
    assert params["layers"] == [0, 1, 2, 3] and params["gate"] is False
    assert not any(k.endswith("sem_gate") for k in full.state_dict())
    assert _flops(full) < _flops(half) < _flops(vit)


def test_exact_when_tokens_are_uniform() -> None:
    """With identical patch tokens, pooled keys carrying their log-mass reproduce full attention."""
    vit = _vit()
    with torch.no_grad():
        vit.pos_embed.zero_()
    model, _ = _dual(vit, tokens=4, layers="0-3")  # the gate starts at 0: pooled values pass unchanged
    x = torch.ones(1, 3, 32, 32) * 0.3
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=1e-4, atol=1e-5)


def test_log_mass_uneven_windows() -> None:
    mass = semantic_log_mass((14, 14), 4).exp()
    assert mass.shape == (16,)
    assert mass.sum().item() == pytest.approx(196.0)


def test_reload_path_identical(vit: torch.nn.Module, images: torch.Tensor) -> None:
    model, params = _dual(vit, tokens=16)
    with torch.no_grad():
        for block in model.blocks[2:]:
            block.attn.sem_gate.uniform_(0.2, 0.8)  # as if fine-tuned
    rebuilt = copy.deepcopy(vit)
    get_method("dual").apply(rebuilt, params, None)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def test_export(vit: torch.nn.Module, images: torch.Tensor) -> None:
    model, _ = _dual(vit, tokens=16)
    exported = torch.export.export(model, (images,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(images), model(images))


def test_non_square_grid_is_an_error() -> None:
    model = _vit(img_size=(32, 24))
    with pytest.raises(VitshrinkError, match="square patch grid"):
        get_method("dual").resolve(model, {}, None)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [(15, "not a square"), (64, "fewer than"), (0, "not a square"), ("x", "whole number")],
)
def test_bad_tokens(vit: torch.nn.Module, tokens: object, match: str) -> None:
    with pytest.raises(VitshrinkError, match=match):
        get_method("dual").resolve(vit, {"tokens": tokens}, None)


def test_bad_knobs(vit: torch.nn.Module) -> None:
    method = get_method("dual")
    with pytest.raises(VitshrinkError, match="no knob"):
        method.resolve(vit, {"m": 4}, None)
    with pytest.raises(VitshrinkError, match="pool"):
        method.resolve(vit, {"pool": "max"}, None)
    with pytest.raises(VitshrinkError, match="out of range"):
        method.resolve(vit, {"layers": "9"}, None)
    twice, params = _dual(vit, tokens=4)
    with pytest.raises(VitshrinkError, match="already"):
        method.apply(twice, params, None)


def test_auto_tokens(vit: torch.nn.Module) -> None:
    assert get_method("dual").resolve(vit, {}, None)["tokens"] == 16  # 8x8 grid -> 4x4
    big = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=0)
    assert get_method("dual").resolve(big, {}, None)["tokens"] == 49  # 14x14 grid -> 7x7


def test_composes_with_glad(vit: torch.nn.Module, images: torch.Tensor) -> None:
    if "glad" not in METHODS:
        pytest.skip("glad is not registered")
    model = copy.deepcopy(vit)
    glad = get_method("glad")
    glad_params = glad.resolve(model, {"layers": "1", "tokens": "36"}, None)
    glad.apply(model, glad_params, None)
    model, params = _dual(model, tokens=9)  # blocks 2-3 now see a 6x6 grid
    assert params["layers"] == [2, 3]
    with torch.no_grad():
        assert model(images).shape == (2, 10)
    rebuilt = copy.deepcopy(vit)
    glad.apply(rebuilt, glad_params, None)
    get_method("dual").apply(rebuilt, params, None)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
    with pytest.raises(VitshrinkError, match="square"):
        _dual_on = copy.deepcopy(vit)
        glad.apply(_dual_on, glad.resolve(_dual_on, {"layers": "1", "tokens": "30"}, None), None)
        _dual(_dual_on, tokens=4)


def test_composes_with_dgssa(vit: torch.nn.Module, images: torch.Tensor) -> None:
    if "dgssa" not in METHODS:
        pytest.skip("dgssa is not registered")
    model = copy.deepcopy(vit)
    dgssa = get_method("dgssa")
    dgssa.apply(model, dgssa.resolve(model, {"layers": "0,1"}, None), None)
    model, _ = _dual(model, tokens=16)
    with torch.no_grad():
        assert model(images).shape == (2, 10)
