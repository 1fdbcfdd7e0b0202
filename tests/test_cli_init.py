"""`vitshrink init`: random (optionally DCT-initialised) models written in timm's Hub layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.cli import run_cli
from vitshrink import load_model
from vitshrink.cli import app
from vitshrink.cli_init import register
from vitshrink.dct_init import dct_matrix

register(app)

VIT = ["vit_tiny_patch16_224", "--img-size", "32", "--num-classes", "10"]
DIM = 192  # vit_tiny's embedding width: each q/k/v block of qkv is 192 x 192


run = run_cli


def _qkv(folder: Path) -> list[torch.Tensor]:
    weights = load_file(folder / "model.safetensors")
    return [weights[f"blocks.{i}.attn.qkv.weight"] for i in range(12)]


def test_register_is_idempotent() -> None:
    register(app)
    assert [c.name for c in app.registered_commands].count("init") == 1


def test_dct_init_q_writes_the_dct_matrix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(
        ["init", *VIT, "--dct-init", "q", "--seed", "1", "-o", str(tmp_path / "dct")], capsys
    )
    assert code == 0, err
    assert "12 attentions" in out
    assert sorted(p.name for p in (tmp_path / "dct").iterdir()) == ["config.json", "model.safetensors"]
    dct = dct_matrix(DIM)
    for weight in _qkv(tmp_path / "dct"):
        assert torch.equal(weight[:DIM], dct)
        assert not torch.allclose(weight[DIM : 2 * DIM], dct) and not torch.allclose(weight[2 * DIM :], dct)
    config = json.loads((tmp_path / "dct" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 10
    assert config["vitshrink_init"]["dct_init"] == "q" and config["vitshrink_init"]["seed"] == 1
    model = load_model(tmp_path / "dct")
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert torch.equal(model.blocks[3].attn.qkv.weight.detach()[:DIM], dct)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    # without --dct-init: timm's random init, the same for every weight the DCT init does not touch
    code, out, err = run(["init", *VIT, "--seed", "1", "-o", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    assert "none" in out
    plain, dct_weights = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "dct" / "model.safetensors"),
    )
    for weight in _qkv(tmp_path / "plain"):
        assert not torch.allclose(weight[:DIM], dct, atol=1e-3)
    assert set(plain) == set(dct_weights)
    for name, tensor in plain.items():
        if name.endswith("attn.qkv.weight"):
            assert torch.equal(tensor[DIM:], dct_weights[name][DIM:])
        else:
            assert torch.equal(tensor, dct_weights[name]), name


def test_qkv_on_swin(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(
        ["init", "swin_tiny", "--img-size", "112", "--dct-init", "qkv", "-o", str(tmp_path / "s")], capsys
    )
    assert code == 0, err
    model = load_model(tmp_path / "s")
    attns = [block.attn for stage in model.layers for block in stage.blocks]
    assert len(attns) == 12
    for attn in attns:
        c = attn.qkv.in_features
        weight = attn.qkv.weight.detach()
        assert all(torch.equal(weight[j * c : (j + 1) * c], dct_matrix(c)) for j in range(3))


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "m"
    assert run(["init", *VIT, "-o", str(target)], capsys)[0] == 0
    before = (target / "model.safetensors").read_bytes()
    code, _, err = run(["init", *VIT, "--seed", "5", "-o", str(target)], capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert (target / "model.safetensors").read_bytes() == before
    code, _, err = run(
        ["init", *VIT, "--seed", "5", "--dct-init", "v", "--overwrite", "-o", str(target)], capsys
    )
    assert code == 0, err
    assert (target / "model.safetensors").read_bytes() != before
    assert torch.equal(_qkv(target)[0][2 * DIM :], dct_matrix(DIM))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folders left behind"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*VIT, "--dct-init", "o"], "--dct-init 'o' is not one of q, k, v, qkv"),
        (["no_such_vit_arch", "--dct-init", "q"], "Unknown model 'no_such_vit_arch'"),
        (["resnet18", "--dct-init", "q"], "has no timm Attention"),
        (["resnet18", "--img-size", "32"], "Could not build 'resnet18' with img_size=32: ResNet"),
    ],
)
def test_bad_requests_are_one_line_errors(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = run(["init", *args, "-o", str(tmp_path / "x")], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
