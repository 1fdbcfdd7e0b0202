"""Shared fixtures: tiny random models and small image folders built in the test."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves a core free

ASSETS = Path(os.environ["VITSHRINK_ASSETS"]) if os.environ.get("VITSHRINK_ASSETS") else None


def tiny_vit(arch: str = "vit_tiny_patch16_224", **overrides) -> torch.nn.Module:
    """A 4x4-token ViT (or another timm ViT ``arch``) with random weights, fast enough for any test."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    args.update(overrides)
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **args).eval()


def with_method(model: torch.nn.Module, name: str, **knobs) -> tuple[torch.nn.Module, dict]:
    """A copy of ``model`` rewritten by method ``name`` (no calibration data), and its resolved params."""
    import copy

    from vitshrink.methods.base import get_method

    model = copy.deepcopy(model)
    method = get_method(name)
    method.check(model)
    params = method.resolve(model, dict(knobs), None)
    method.apply(model, params, None)
    return model, params


def tiny_swin(**overrides) -> torch.nn.Module:
    """A two-stage Swin (14x14 patches, 7x7 windows; the second block of stage 0 is shifted)."""
    args = dict(img_size=56, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10)
    args.update(overrides)
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **args).eval()


@pytest.fixture
def vit() -> torch.nn.Module:
    return tiny_vit()


def write_images(folder: Path, count: int, *, size: int = 40, labels: list[int] | None = None, metadata: bool = True) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    if metadata:
        with (folder / "metadata.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "label"])
            for i, path in enumerate(paths):
                writer.writerow([path.name, (labels[i] if labels else i % 10)])
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 12)
    return folder


def needs_assets(*parts: str) -> Path:
    """The shared asset path, or skip the test with the reason."""
    if ASSETS is None:
        pytest.skip("real assets not available: set VITSHRINK_ASSETS to ../shared/assets (make test does)")
    path = ASSETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real asset {path} is missing")
    return path
