"""`accelerate launch` with two CPU processes runs `vitshrink compress` unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from timm.models._hub import save_for_hf

from tests.conftest import tiny_vit, write_images

REPO = Path(__file__).resolve().parents[1]


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


@pytest.mark.slow
def test_two_processes_write_once_and_match_single_process(tmp_path: Path) -> None:
    save_for_hf(tiny_vit(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3), tmp_path / "model",
                safe_serialization=True)
    write_images(tmp_path / "images", 24)
    args = ["compress", str(tmp_path / "model"), "--method", "dgssa+glad", "--calib", str(tmp_path / "images"),
            "--steps", "4", "--batch-size", "4", "--analysis-images", "12", "--bench-rounds", "2",
            "--bench-batch-size", "4", "-q"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "vitshrink", *args, "-o", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "vitshrink", *args, "-o", str(tmp_path / "multi")]
    multi = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-3000:]

    # written once: one output folder, no temporary or state folders beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model", "multi", "single"]
    assert multi.stdout.count("Wrote") == 1
    single_cfg = json.loads((tmp_path / "single" / "config.json").read_text())
    multi_cfg = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert multi_cfg["vitshrink"]["methods"] == single_cfg["vitshrink"]["methods"]
    assert _shapes(tmp_path / "multi") == _shapes(tmp_path / "single")
    report = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert report["finetune"]["processes"] == 2 and report["finetune"]["steps_done"] == 4
    single_report = json.loads((tmp_path / "single" / "report.json").read_text())
    assert report["evaluation"]["images"] == single_report["evaluation"]["images"]  # sharded eval, counts gathered
