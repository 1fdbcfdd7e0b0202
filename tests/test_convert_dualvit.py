"""convert_dualvit: official Dual-ViT .pth.tar -> timm Hub-layout folder (config.json + model.safetensors)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import vitshrink.models  # noqa: F401  (registers dualvit_*)
from vitshrink.convert import convert_dualvit
from vitshrink.errors import VitshrinkError


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("dualvit_s").eval()


@pytest.fixture(scope="module")
def official(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random dualvit_s saved as the official training script does (DataParallel prefixes, extras)."""
    path = tmp_path_factory.mktemp("ckpt") / "dualvit_s.pth.tar"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1, "args": argparse.Namespace(model="dualvit_s")}, path)
    return path


def test_convert_and_load_back(model: torch.nn.Module, official: Path, tmp_path: Path) -> None:
    out = convert_dualvit(official, tmp_path / "out", trust_pickle=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "dualvit_s" and cfg["num_classes"] == 1000 and cfg["num_features"] == 448
    assert cfg["pretrained_cfg"]["input_size"] == [3, 224, 224]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # an existing output is refused, and replaced only with overwrite (here with the 384px config)
    with pytest.raises(VitshrinkError, match="already exists"):
        convert_dualvit(official, out, trust_pickle=True)
    convert_dualvit(official, out, variant="dualvit_s.in1k_384", trust_pickle=True, overwrite=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [3, 384, 384]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_pickle_needs_trust(official: Path, tmp_path: Path) -> None:
    with pytest.raises(VitshrinkError, match="--trust-pickle"):
        convert_dualvit(official, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_dualvit_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth.tar"
    torch.save(
        {"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}, path
    )
    with pytest.raises(
        VitshrinkError, match=r"Not a Dual-ViT checkpoint: \d+ of \d+ expected keys are missing \(q, "
    ):
        convert_dualvit(path, tmp_path / "out", trust_pickle=True)


def test_missing_keys_named(model: torch.nn.Module, tmp_path: Path) -> None:
    state = dict(model.state_dict())
    del state["block2.1.attn.q_proxy.weight"], state["norm_proxy1.bias"]
    path = tmp_path / "partial.safetensors"  # safetensors needs no trust
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(VitshrinkError, match=r"closest is dualvit_s: 2 missing keys \(.*norm_proxy1.bias"):
        convert_dualvit(path, tmp_path / "out")
    with pytest.raises(VitshrinkError, match="does not match dualvit_b"):
        convert_dualvit(path, tmp_path / "out", variant="b")
    with pytest.raises(VitshrinkError, match="Unknown Dual-ViT variant"):
        convert_dualvit(path, tmp_path / "out", variant="xl")


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(VitshrinkError, match="does not exist"):
        convert_dualvit(tmp_path / "nope.pth.tar", tmp_path / "out", trust_pickle=True)


def test_cli_convert(official: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vitshrink.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["convert", "dualvit", str(official), str(tmp_path / "cli")])
    assert refused.value.code == 2 and "--trust-pickle" in capsys.readouterr().err
    main(["convert", "dualvit", str(official), str(tmp_path / "cli"), "--trust-pickle"])
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as bad_family:
        main(["convert", "resnet", str(official), str(tmp_path / "x")])
    assert bad_family.value.code == 2 and "supported: dualvit" in capsys.readouterr().err
