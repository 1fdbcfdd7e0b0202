"""Run a tiny distillation under ``accelerate launch`` (used by tests/test_finetune.py).

Usage: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 distill_mp.py OUT``

Every process writes ``OUT/rank<i>.json`` (a checksum of its trained student, the step count,
the world size); the main process alone writes ``OUT/student.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import timm
import torch
from accelerate import PartialState
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from vitshrink.finetune import FinetuneConfig, distill


def tiny_vit() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=2,
        num_heads=3,
        num_classes=10,
    )


def main(out: Path) -> None:
    torch.manual_seed(0)
    teacher, student = tiny_vit(), tiny_vit()
    train_set = TensorDataset(torch.randn(64, 3, 32, 32), torch.zeros(64, dtype=torch.long))
    config = FinetuneConfig(steps=6, lr=1e-3, batch_size=8, save_every=3, mixed_precision="auto")
    result = distill(
        student, teacher, train_set, config, feature_layers=[1], state_dir=out / "state", progress=False
    )
    state = PartialState()
    weights = {k: v.detach().cpu().contiguous() for k, v in result.student.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].numpy().tobytes())
    info = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "steps_done": result.steps_done,
        "losses": result.losses,
        "sha256": digest.hexdigest(),
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(info))
    if state.is_main_process:
        save_file(weights, str(out / "student.safetensors"))
    state.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
