"""Every model source loads back the same model; bad sources are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from tests.conftest import tiny_vit
from tests.helpers.hub_cache import add_repo_to_cache
from vitshrink import load_model
from vitshrink.errors import VitshrinkError
from vitshrink.sources import resolve_name


def _same(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_alias_and_timm_name_resolve() -> None:
    assert resolve_name("deit_small") == "deit_small_patch16_224"
    assert resolve_name("swin_tiny") == "swin_tiny_patch4_window7_224"
    assert resolve_name("deit_small_patch16_224.fb_in1k") == "deit_small_patch16_224.fb_in1k"
    model = load_model("deit_tiny", pretrained=False)
    assert model.pretrained_cfg["architecture"] == "deit_tiny_patch16_224"
    assert not model.training


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(VitshrinkError, match="Close matches: deit_small"):
        load_model("deit_smal")


def test_pretrained_weights_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(VitshrinkError, match="--random-init"):
        load_model("deit_tiny")


def test_timm_hub_layout_folder_roundtrip(tmp_path: Path) -> None:
    model = tiny_vit()
    save_for_hf(model, tmp_path / "m", safe_serialization=True)
    loaded = load_model(tmp_path / "m")
    _same(model, loaded)
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, 32, 32)


def test_safetensors_file_with_arch(tmp_path: Path) -> None:
    model = timm.create_model("test_vit", num_classes=7).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(VitshrinkError, match="--arch"):
        load_model(tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", arch="test_vit")
    assert loaded.num_classes == 7
    _same(model, loaded, size=160)


def test_mismatched_keys_are_named(tmp_path: Path) -> None:
    state = timm.create_model("test_vit").state_dict()
    state.pop("blocks.0.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(VitshrinkError, match=r"missing 1 \(blocks.0.attn.qkv.weight\); unexpected 1 \(extra.weight\)"):
        load_model(tmp_path / "w.safetensors", arch="test_vit")


def test_unreadable_safetensors(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(VitshrinkError, match="not a readable safetensors"):
        load_model(tmp_path / "w.safetensors", arch="test_vit")


def test_pickle_needs_trust(tmp_path: Path) -> None:
    model = timm.create_model("test_vit").eval()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "w.pth")
    with pytest.raises(VitshrinkError, match="--trust-pickle"):
        load_model(tmp_path / "w.pth", arch="test_vit")
    loaded = load_model(tmp_path / "w.pth", arch="test_vit", trust_pickle=True)
    _same(model, loaded, size=160)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitshrinkError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_hub_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf-hub:org/name from a real Hub cache layout with HF_HUB_OFFLINE=1."""
    import huggingface_hub.constants as hf_constants

    model = tiny_vit()
    save_for_hf(model, tmp_path / "export", safe_serialization=True)
    cache = tmp_path / "hub"
    add_repo_to_cache(cache, "someone/tiny-vit", tmp_path / "export")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    loaded = load_model("hf-hub:someone/tiny-vit")
    _same(model, loaded)
    with pytest.raises(VitshrinkError, match="not in the local Hub cache"):
        load_model("hf-hub:someone/missing")


def test_embedded_model_loads() -> None:
    from vitshrink.sources import EMBEDDED_MODELS

    if not (EMBEDDED_MODELS["vitshrink:fashion-vit"] / "model.safetensors").exists():
        pytest.skip("embedded model not trained yet")
    model = load_model("vitshrink:fashion-vit")
    assert model.num_classes == 10
    grid = model.patch_embed.grid_size
    assert grid[0] >= 8 and grid[1] >= 8 and model.num_prefix_tokens >= 1
    size = (EMBEDDED_MODELS["vitshrink:fashion-vit"] / "model.safetensors").stat().st_size
    assert size <= 5 * 1024 * 1024
