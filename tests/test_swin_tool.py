"""Swin through the whole tool on tiny models: load, eval, bench, compress with dct, reload, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.models._hub import save_for_hf

from tests.conftest import tiny_swin, write_images
from tests.helpers.cli import run_cli
from vitshrink import load_model
from vitshrink.compress import CompressConfig, compress
from vitshrink.finetune import FinetuneConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("swin")
    save_for_hf(tiny_swin(), root / "swin", safe_serialization=True)
    save_for_hf(tiny_swin(embed_dim=48), root / "swin-wide", safe_serialization=True)
    write_images(root / "images", 16, size=64)
    return root


run = run_cli


def test_load_folder_gives_the_saved_model(root: Path) -> None:
    model = load_model(root / "swin")
    assert type(model).__name__ == "SwinTransformer" and model.embed_dim == 24
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_swin()(x), rtol=0, atol=0)
    assert model.pretrained_cfg["input_size"] == (3, 56, 56)


def test_eval_without_and_with_speed(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["eval", str(root / "swin"), "--data", str(root / "images"), "-q", "-b", "4"]
    code, _, err = run(
        [*base, "--no-speed", "--reference", str(root / "swin"), "-o", str(tmp_path / "a.json")], capsys
    )
    assert code == 0, err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["accuracy"]["images"] == 16 and report["accuracy"]["agreement_top1"] == 1.0
    assert report["cost"]["gflops"] > 0 and not report.get("throughput")
    code, out, err = run([*base, "--runs", "2", "-o", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["throughput"]["images_per_second"] > 0 and report["memory"]["peak_mb"] > 0
    assert "throughput" in out


def test_bench_two_swin_variants(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "bench.json"
    code, _, err = run(
        [
            "bench",
            str(root / "swin"),
            str(root / "swin-wide"),
            "--random-init",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "-b",
            "2",
            "-q",
            "-o",
            str(out_json),
        ],
        capsys,
    )
    assert code == 0, err
    rows = json.loads(out_json.read_text())["models"]
    assert [r["name"] for r in rows] == [str(root / "swin"), str(root / "swin-wide")]
    assert rows[0]["ratio"] == 1.0 and rows[1]["gflops"] > rows[0]["gflops"] > 0


def test_cli_compress_dct_end_to_end(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "swin-dct"
    code, stdout, err = run(
        [
            "compress",
            str(root / "swin"),
            "--method",
            "dct",
            "--keep",
            "0.5",
            "--calib",
            str(root / "images"),
            "--steps",
            "2",
            "-b",
            "4",
            "--bench-rounds",
            "2",
            "--bench-batch-size",
            "4",
            "-q",
            "-o",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert {"config.json", "model.safetensors", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    (method,) = json.loads((out / "config.json").read_text())["vitshrink"]["methods"]
    assert (
        method["name"] == "dct" and method["params"]["family"] == "swin" and method["params"]["keep"] == 0.5
    )
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps_done"] == 2 and report["evaluation"]["images"] == 8
    assert report["compressed"]["cost"]["gflops"] < report["original"]["cost"]["gflops"]
    assert report["speed"]["ratio"] > 0 and "Speed-up" in stdout
    reloaded = load_model(out)
    assert type(reloaded.layers[0].blocks[0].attn).__name__ == "DCTWindowAttention"
    # the output folder is a model source like any other
    code, _, err = run(
        [
            "eval",
            str(out),
            "--data",
            str(root / "images"),
            "--reference",
            str(root / "swin"),
            "--no-speed",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err


def test_compress_dct_reload_gives_identical_outputs(root: Path, tmp_path: Path) -> None:
    config = CompressConfig(
        model=str(root / "swin"),
        method="dct",
        calib=str(root / "images"),
        knobs={"dct": {"keep": 0.5}},
        finetune=FinetuneConfig(steps=2, batch_size=4),
        output=tmp_path / "o",
        speed=False,
    )
    result = compress(config, progress=False)
    assert result.output is not None
    reloaded = load_model(result.output)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model.cpu().eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("glad", "Swin's windowed attention"),
        ("dgssa", "dgssa supports ViT/DeiT only"),
        ("tome", "not a plain ViT/DeiT"),
        ("dual", "not a plain ViT/DeiT"),
    ],
)
def test_vit_only_methods_refuse_swin(
    root: Path, tmp_path: Path, method: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = run(
        [
            "compress",
            str(root / "swin"),
            "--method",
            method,
            "--calib",
            str(root / "images"),
            "--steps",
            "0",
            "--no-speed",
            "-q",
            "-o",
            str(tmp_path / "x"),
        ],
        capsys,
    )
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
