"""The compression pipeline end to end on a tiny model: output folder, reload, recipes, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.models._hub import save_for_hf

from tests.conftest import tiny_vit, write_images
from vitshrink import load_model
from vitshrink.cli import main
from vitshrink.compress import CompressConfig, compress
from vitshrink.errors import VitshrinkError
from vitshrink.finetune import FinetuneConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compress")
    save_for_hf(tiny_vit(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3), root / "model",
                safe_serialization=True)
    write_images(root / "images", 32)
    return root


def _config(root: Path, out: str, **kwargs) -> CompressConfig:
    base = dict(model=str(root / "model"), method="dgssa+glad", calib=str(root / "images"),
                finetune=FinetuneConfig(steps=3, batch_size=8, save_every=1), output=root / out,
                bench_rounds=2, bench_batch_size=4, analysis_images=16)
    base.update(kwargs)
    return CompressConfig(**base)


def test_compress_writes_a_reloadable_folder(setup: Path) -> None:
    result = compress(_config(setup, "out"), progress=False)
    out = result.output
    assert out is not None
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json", "analysis.png", "config.json", "model.safetensors", "report.json", "report.md"]
    config = json.loads((out / "config.json").read_text())
    section = config["vitshrink"]
    assert [m["name"] for m in section["methods"]] == ["dgssa", "glad"]
    assert section["base_architecture"] == "vit_tiny_patch16_224" and section["input_size"] == [3, 32, 32]
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps_done"] == 3
    assert report["evaluation"]["images"] == 16  # the held-out half of --calib
    assert 0 <= report["compressed"]["accuracy"]["agreement_top1"] <= 1
    assert report["compressed"]["cost"]["gflops"] < report["original"]["cost"]["gflops"]
    assert report["speed"]["ratio"] > 0 and report["original"]["accuracy"]["top1"] is not None
    # the reloaded model gives the outputs of the model that was saved
    reloaded = load_model(out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model.cpu().eval()(x), rtol=0, atol=0)
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "temp or state folders left behind"
    # a different input size is a clear error for static attention
    with pytest.raises((VitshrinkError, AssertionError, RuntimeError), match="(?i)size|token|match"):
        reloaded(torch.randn(1, 3, 48, 48))


def test_existing_output_is_refused_and_untouched(setup: Path) -> None:
    out = setup / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(VitshrinkError, match="--overwrite"):
        compress(_config(setup, "taken"), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_leaves_nothing_at_the_output(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitshrink.compress as pipeline

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_compressed", boom)
    with pytest.raises(KeyboardInterrupt):
        compress(_config(setup, "interrupted", finetune=FinetuneConfig(steps=0)), progress=False)
    assert not (setup / "interrupted").exists()
    assert not [p for p in setup.iterdir() if p.name.startswith(".interrupted")]


def test_resume_continues_an_interrupted_fine_tune(setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitshrink.compress as pipeline

    real_write = pipeline._write_output
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_write_output", interrupted)
    cfg = _config(setup, "resumed", finetune=FinetuneConfig(steps=4, batch_size=8, save_every=2))
    with pytest.raises(KeyboardInterrupt):
        compress(cfg, progress=False)
    assert (setup / ".resumed.state").exists() and not (setup / "resumed").exists()
    monkeypatch.setattr(pipeline, "_write_output", real_write)
    cfg.resume = True
    result = compress(cfg, progress=False)
    assert result.report["finetune"]["resumed_from"] == 4
    assert (setup / "resumed" / "model.safetensors").exists()
    assert not (setup / ".resumed.state").exists()


def test_resume_without_state(setup: Path) -> None:
    with pytest.raises(VitshrinkError, match="Nothing to resume"):
        compress(_config(setup, "never", resume=True), progress=False)


def test_cli_compress_with_recipe_and_overrides(setup: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "method: dgssa+glad\nknobs:\n  dgssa: {layers: [0, 1]}\n  glad: {layers: [3], tokens: [16]}\n"
        "finetune: {steps: 2, batch_size: 8}\ncalibration: {analysis_images: 16, bench_rounds: 2, bench_batch_size: 4}\n"
    )
    out = tmp_path / "cli-out"
    main(["compress", str(setup / "model"), "--recipe", str(recipe), "--calib", str(setup / "images"),
          "--glad-tokens", "32", "-o", str(out), "-q"])
    methods = json.loads((out / "config.json").read_text())["vitshrink"]["methods"]
    assert methods[0]["params"]["layers"] == [0, 1]
    assert methods[1]["params"]["layers"] == [3] and methods[1]["params"]["tokens"] == [32]
    assert "Speed-up" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "dgssa+nope"], "Unknown method 'nope'"),
        (["--method", "dgssa", "--dgssa-layers", "40"], "out of range"),
        (["--method", "dgssa", "--glad-tokens", "8"], "--glad-tokens given but 'glad'"),
        (["--method", "glad", "--set", "glad.tokens=100"], "between 1 and 63"),
        (["--method", "dgssa", "--recipe", "does-not-exist"], "No recipe"),
    ],
)
def test_cli_bad_requests(setup: Path, tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(setup / "model"), "--calib", str(setup / "images"), "--steps", "0", "--no-speed",
              "-o", str(tmp_path / "x"), "-q", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_glad_on_swin_is_a_clear_error(tmp_path: Path) -> None:
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                             depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10)
    save_for_hf(swin, tmp_path / "swin", safe_serialization=True)
    write_images(tmp_path / "imgs", 8)
    with pytest.raises(VitshrinkError, match="(?i)swin"):
        compress(CompressConfig(model=str(tmp_path / "swin"), method="glad", calib=str(tmp_path / "imgs"),
                                finetune=FinetuneConfig(steps=0), output=tmp_path / "o", speed=False), progress=False)


def test_too_few_calibration_images(tmp_path: Path, setup: Path) -> None:
    write_images(tmp_path / "few", 6)
    with pytest.raises(VitshrinkError, match="at least 8"):
        compress(_config(setup, "few", calib=str(tmp_path / "few"), finetune=FinetuneConfig(steps=0)), progress=False)
