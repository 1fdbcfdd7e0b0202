"""The loading and preprocessing path on real data: DeiT-tiny on 500 ImageNet images is 79.2% top-1."""

from __future__ import annotations

import pytest

from tests.conftest import needs_assets
from vitshrink import load_model
from vitshrink.data import resolve_data
from vitshrink.evaluate import evaluate


@pytest.mark.assets
def test_deit_tiny_top1_on_imagenet_sample() -> None:
    weights = needs_assets("deit_tiny_patch16_224.safetensors")
    images = needs_assets("imagenet-sample-dev")
    model = load_model(weights, arch="deit_tiny")
    source = resolve_data(images)
    assert len(source) == 500
    result = evaluate(model, source, batch_size=50, progress=False)
    assert result.images == 500 and result.skipped == 0
    assert round(result.top1 * 500) == 396  # 79.2%, the value timm's own preprocessing gives
