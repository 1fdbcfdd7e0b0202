"""DCT (truncated-basis) attention and the DCT init, on tiny random timm ViT and Swin models."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import tiny_swin
from vitshrink.dct_init import apply_dct_init, dct_init_, dct_matrix
from vitshrink.errors import VitshrinkError
from vitshrink.methods.base import CalibrationContext, get_method
from vitshrink.methods.dct import DCTAttention, DCTWindowAttention, attention_modules


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=48,
        depth=6,
        num_heads=3,
        num_classes=10,
    ).eval()


def _swin() -> torch.nn.Module:
    return tiny_swin()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return _vit()


@pytest.fixture(scope="module")
def swin() -> torch.nn.Module:
    return _swin()


def _images(size: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, size, size)


def _dct(
    model: torch.nn.Module, ctx: CalibrationContext | None = None, **knobs: object
) -> tuple[torch.nn.Module, dict]:
    model = copy.deepcopy(model)
    method = get_method("dct")
    params = method.resolve(model, dict(knobs), None)
    method.apply(model, params, ctx)
    return model, params


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def test_dct_matrix_orthonormal() -> None:
    for n in (1, 7, 16, 48):
        d = dct_matrix(n, dtype=torch.float64)
        assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    d = dct_matrix(8, dtype=torch.float64)
    x = torch.arange(8, dtype=torch.float64)
    # Closed-form DCT-II with orthonormal scaling, coefficient 1.
    expected = math.sqrt(2 / 8) * sum(float(x[i] * math.cos(math.pi * (2 * i + 1) / 16)) for i in range(8))
    assert torch.isclose((d @ x)[1], torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(d[0], torch.full((8,), 8**-0.5, dtype=torch.float64))


@pytest.mark.parametrize("basis", ["dct", "svd"])
@pytest.mark.parametrize("fused", [True, False])
def test_vit_tau1_exact(vit: torch.nn.Module, basis: str, fused: bool) -> None:
    x = _images(32)
    model, params = _dct(vit, keep=1, basis=basis)
    assert params["layers"] == list(range(6)) and params["family"] == "vit"
    assert all(type(m) is DCTAttention for _, m in attention_modules(model))
    for _, m in attention_modules(model):
        m.fused_attn = fused
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5)


@pytest.mark.parametrize("basis", ["dct", "svd"])
def test_swin_tau1_exact(swin: torch.nn.Module, basis: str) -> None:
    x = _images(56)
    model, params = _dct(swin, keep=1.0, basis=basis)
    assert params["family"] == "swin"
    attns = attention_modules(model)
    assert len(attns) == 4 and all(type(m) is DCTWindowAttention for _, m in attns)
    assert any(blk.shift_size != (0, 0) for blk in model.layers[0].blocks)  # shifted windows exercised
    with torch.no_grad():
        assert torch.allclose(model(x), swin(x), atol=1e-5)


def test_pca_with_calibration(vit: torch.nn.Module, swin: torch.nn.Module) -> None:
    for ref, size in ((vit, 32), (swin, 56)):
        x = _images(size)
        ctx = CalibrationContext(images=_images(size, n=6, seed=2), batch_size=3)
        model, _ = _dct(ref, ctx, keep=1.0, basis="pca")
        with torch.no_grad():
            assert torch.allclose(model(x), ref(x), atol=1e-5)
        # Truncated: PCA of the calibration tokens approximates better than the data-free DCT basis.
        pca, _ = _dct(ref, ctx, keep=0.5, basis="pca")
        dct, _ = _dct(ref, None, keep=0.5, basis="dct")
        with torch.no_grad():
            out = ref(x)
            err_pca, err_dct = (pca(x) - out).norm(), (dct(x) - out).norm()
        assert torch.isfinite(pca(x)).all() and err_pca < err_dct


def test_half_keep_shapes_and_flops(vit: torch.nn.Module, swin: torch.nn.Module) -> None:
    x = _images(32)
    model, _ = _dct(vit, keep=0.5)
    attn = model.blocks[0].attn
    # C=48, 3 heads of 16 -> 24 kept channels, head dim 8; tau < 2/3 keeps the paper's Linear(k, 3k).
    assert attn.basis.shape == (24, 48)
    assert attn.qkv.weight.shape == (72, 24) and attn.proj.weight.shape == (48, 24)
    assert attn.head_dim == 8 and attn.scale == 16**-0.5
    assert _flops(model, x) < 0.9 * _flops(vit, x)
    # tau = 0.75 folds the input transform into qkv: Linear(C, 3k), no buffer.
    model, _ = _dct(vit, keep=0.75)
    attn = model.blocks[0].attn
    assert attn.basis is None and attn.qkv.weight.shape == (108, 48)
    # Swin, stage 0: C=24, 2 heads of 12 -> 12 kept, head dim 6.
    xs = _images(56)
    model, _ = _dct(swin, keep=0.5)
    attn = model.layers[0].blocks[0].attn
    assert attn.qkv.weight.shape == (36, 12) and attn.basis.shape == (12, 24)
    assert (
        attn.relative_position_bias_table.shape
        == swin.layers[0].blocks[0].attn.relative_position_bias_table.shape
    )
    assert _flops(model, xs) < _flops(swin, xs)


def test_layers_and_per_layer_keep(vit: torch.nn.Module) -> None:
    model, params = _dct(vit, keep=[0.5, 0.25], layers="1,3")
    assert params["keep"] == [0.5, 0.25] and params["layers"] == [1, 3]
    assert type(model.blocks[0].attn).__name__ == "Attention"
    assert model.blocks[1].attn.head_dim == 8 and model.blocks[3].attn.head_dim == 4
    assert get_method("dct").distill_layers(params) == [1, 3]


@pytest.mark.parametrize("which", ["vit", "swin"])
@pytest.mark.parametrize("basis", ["dct", "pca"])
def test_reload_path(vit: torch.nn.Module, swin: torch.nn.Module, which: str, basis: str) -> None:
    ref, size = (vit, 32) if which == "vit" else (swin, 56)
    x = _images(size)
    ctx = CalibrationContext(images=_images(size, n=4, seed=3))
    model, params = _dct(ref, ctx, keep=0.5, basis=basis)
    state = model.state_dict()
    fresh = _vit() if which == "vit" else _swin()
    get_method("dct").apply(fresh, params, None)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_train_gradients(vit: torch.nn.Module) -> None:
    model, _ = _dct(vit, keep=0.5)
    model.train()
    model(_images(32)).square().mean().backward()
    attn = model.blocks[0].attn
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().sum() > 0
    assert not attn.basis.requires_grad


def test_bad_input(vit: torch.nn.Module) -> None:
    method = get_method("dct")
    for keep in (0, -0.5, 1.5):
        with pytest.raises(VitshrinkError, match=r"must be in \(0, 1\].*multiples of 1/16"):
            method.resolve(copy.deepcopy(vit), {"keep": keep}, None)
    with pytest.raises(VitshrinkError, match="not a whole number.*e.g. 0.25, 0.5, 0.75, 1"):
        method.resolve(copy.deepcopy(vit), {"keep": 0.3}, None)
    with pytest.raises(VitshrinkError, match="one per layer"):
        method.resolve(copy.deepcopy(vit), {"keep": [0.5, 0.5]}, None)
    with pytest.raises(VitshrinkError, match="basis"):
        method.resolve(copy.deepcopy(vit), {"basis": "wavelet"}, None)
    with pytest.raises(VitshrinkError, match="out of range"):
        method.resolve(copy.deepcopy(vit), {"layers": "7"}, None)
    model, params = _dct(vit, keep=0.5)
    with pytest.raises(VitshrinkError, match="already applied"):
        method.apply(model, params, None)
    with pytest.raises(VitshrinkError, match="ViT, DeiT and Swin"):
        method.check(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_dct_init(vit: torch.nn.Module, swin: torch.nn.Module) -> None:
    model = copy.deepcopy(vit)
    attn = model.blocks[0].attn
    before = attn.qkv.weight.detach().clone()
    dct_init_(attn, "k")
    w, d = attn.qkv.weight.detach(), dct_matrix(48)
    assert torch.equal(w[48:96], d)
    assert torch.equal(w[:48], before[:48]) and torch.equal(w[96:], before[96:])
    assert apply_dct_init(model, "qkv") == 6
    assert all(
        torch.equal(b.attn.qkv.weight[i * 48 : (i + 1) * 48], d) for b in model.blocks for i in range(3)
    )
    sw = copy.deepcopy(swin)
    assert apply_dct_init(sw, "q") == 4
    stage1 = sw.layers[1].blocks[0].attn.qkv.weight
    assert torch.equal(stage1[:48], dct_matrix(48)) and torch.isfinite(sw(_images(56))).all()
    # A truncated attention's qkv (Linear(24, 3*24)) gets the DCT of its own size.
    small, _ = _dct(vit, keep=0.5)
    dct_init_(small.blocks[0].attn, "v")
    assert torch.equal(small.blocks[0].attn.qkv.weight[48:], dct_matrix(24))
    with pytest.raises(VitshrinkError, match="which"):
        dct_init_(attn, "o")
    with pytest.raises(VitshrinkError, match="not a timm Attention"):
        dct_init_(torch.nn.Linear(3, 3))
