"""Dual-ViT in timm: published sizes, the token-labelling head, the timm model API.

Parameter and FLOP counts use models built on the 'meta' device: no memory, no weight init, and
FlopCounterMode counts from shapes, so the counts are those of a real model (checked once for
Dual-ViT-S on the CPU below). GFLOPs count a multiply-add as one FLOP (FlopCounterMode's total / 2).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import vitshrink.models  # noqa: F401  (registers dualvit_*)
from vitshrink.models.dualvit import DualViT

# FlopCounterMode does not count the CPU SDPA kernel: count it with torch's own SDPA formula.
_FLOPS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _FLOPS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = (
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    )

PUBLISHED = {"dualvit_s": (25.1, 5.4), "dualvit_b": (42.6, 9.3), "dualvit_l": (73.0, 18.0)}


def _gflops(model: torch.nn.Module, device: str) -> float:
    with FlopCounterMode(display=False, custom_mapping=_FLOPS) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224, device=device))
    return counter.get_total_flops() / 2 / 1e9


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_params_and_gflops(name: str) -> None:
    params_m, gflops = PUBLISHED[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(n, 1) == params_m, f"{name}: {n:.3f}M parameters"
    measured = _gflops(model, "meta")
    assert abs(measured - gflops) / gflops < 0.03, f"{name}: {measured:.3f} GFLOPs"


def test_meta_flops_equal_cpu_flops() -> None:
    with torch.device("meta"):
        meta = timm.create_model("dualvit_s")
    cpu = meta.to_empty(device="cpu")
    with torch.no_grad():
        for p in cpu.parameters():
            p.normal_(0, 0.02)
        for name, b in cpu.named_buffers():
            b.fill_(1 if "running_var" in name else 0)
    with torch.device("meta"):
        meta = timm.create_model("dualvit_s")
    assert _gflops(cpu, "cpu") == pytest.approx(_gflops(meta, "meta"), rel=1e-6)


def _tiny(**kw: object) -> DualViT:
    torch.manual_seed(0)
    args: dict = dict(
        stem_hidden_dim=8,
        embed_dims=(16, 32, 48, 64),
        num_heads=(1, 2, 3, 4),
        depths=(1, 2, 2, 1),
        num_classes=10,
    )
    args.update(kw)
    return DualViT(**args)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def test_registered_with_timm_cfg() -> None:
    assert {"dualvit_s", "dualvit_b", "dualvit_l"} <= set(timm.list_models("dualvit*"))
    with torch.device("meta"):
        model = timm.create_model("dualvit_b", num_classes=7)
    cfg = model.pretrained_cfg
    assert cfg["license"] == "apache-2.0" and cfg["paper_ids"] == "arXiv:2207.04976"
    assert (
        cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.96 and cfg["interpolation"] == "bicubic"
    )
    assert not cfg["hf_hub_id"]
    assert model.head.out_features == 7 and model.aux_head.out_features == 7
    assert "dualvit_s.in1k_384" in timm.list_models("dualvit_s*", include_tags=True)


def test_eval_output_is_cls_plus_half_max_aux(images: torch.Tensor) -> None:
    model = _tiny().eval()
    with torch.no_grad():
        feats = model.forward_features(images)
        out = model(images)
        expected = model.head(feats[:, 0]) + 0.5 * model.aux_head(feats[:, 1:]).max(1)[0]
    assert feats.shape == (2, 1 + 2 * 2, 64)  # class token + the final 2x2 grid (64px input)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, model.head(feats[:, 0]))
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)


def test_train_output_as_official(images: torch.Tensor) -> None:
    model = _tiny(use_mix_token=True).train()
    cls, aux, bbox = model.forward_train(images)
    assert cls.shape == (2, 10) and aux.shape == (2, 4, 10) and len(bbox) == 4
    assert model(images).shape == (2, 10)  # plain forward: logits in train mode too (timm convention)
    no_aux = _tiny(use_aux_head=False).train()
    assert no_aux.forward_train(images).shape == (2, 10)
    assert not hasattr(no_aux, "aux_head") or no_aux.aux_head is None


def test_reset_classifier_and_other_sizes(images: torch.Tensor) -> None:
    model = _tiny().eval()
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(images).shape == (2, 5)
        model.reset_classifier(0)
        assert model(images).shape == (2, 64)
        # 96px: a 24x24 stem grid pools to 3x3 semantic tokens (the 8x8 queries are resized)
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 64)


def test_drop_path_and_grad_checkpointing(images: torch.Tensor) -> None:
    model = _tiny(drop_path_rate=0.1).train()
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    assert model.q.grad is not None and model.block1[0].attn.q_proxy.weight.grad is not None


def test_dualvit_gflops_and_bench_through_vitshrink() -> None:
    """count_gflops and bench run Dual-ViT (its learnable queries broke FLOP counting under inference_mode)."""
    from vitshrink.bench import bench
    from vitshrink.measure import RunSettings, count_gflops

    model = timm.create_model("dualvit_s", num_classes=10).eval()
    assert count_gflops(model, (3, 224, 224)) > 0
    rows = bench([("dual", model, (3, 224, 224))], RunSettings(), batch_size=1, rounds=1, warmup=0, progress=False)
    assert rows[0].ratio == 1.0 and rows[0].gflops > 0
