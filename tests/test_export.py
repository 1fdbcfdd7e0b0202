"""Export to ONNX / TorchScript / ExportedProgram, checked against PyTorch, written atomically."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import tiny_vit
from vitshrink.checkpoint import save_compressed
from vitshrink.errors import VitshrinkError
from vitshrink.export import FORMATS, ExportResult, default_output, export_model
from vitshrink.methods import METHODS, get_method

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
KNOBS: dict[str, dict[str, Any]] = {"tome": {"r": 1}, "dct": {"keep": 0.5}}
"""Methods tested in every format, with knobs that fit the tiny model."""


def _compressed(folder: Path, method: str | None, knobs: dict[str, Any] | None = None, **model_args: Any) -> Path:
    model = tiny_vit(**model_args)
    methods = []
    if method:
        m = get_method(method)
        m.check(model)
        params = m.resolve(model, dict(knobs or {}), None)
        m.apply(model, params, None)
        methods = [{"name": method, "params": params}]
    save_compressed(model, folder, base_architecture="vit_tiny_patch16_224", methods=methods, source="test",
                    input_size=(3, 32, 32))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    out = {"original": _compressed(root / "original", None, depth=2)}
    for name, knobs in KNOBS.items():
        out[name] = _compressed(root / name, name, knobs, depth=2)
    return out


def _run_exported(result: ExportResult, x: torch.Tensor) -> torch.Tensor:
    if result.format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
            return torch.jit.load(str(result.path))(x)
    if result.format == "exported-program":
        return torch.export.load(str(result.path)).module()(x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("which", ["original", *KNOBS])
def test_export_matches_pytorch(folders: dict[str, Path], tmp_path: Path, fmt: str, which: str) -> None:
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("onnx, onnxscript or onnxruntime not installed (pip install 'vitshrink[onnx]')")
    output = tmp_path / f"model{FORMATS[fmt]}"
    result = export_model(str(folders[which]), fmt, output)
    assert result.path == output and output.is_file()
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert result.input_size == (3, 32, 32) and result.dynamic_batch
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # no temporary files left
    from vitshrink.sources import load_model

    model = load_model(folders[which])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_run_exported(result, x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(KNOBS)))
def test_other_methods_export(method: str, tmp_path: Path) -> None:
    """Every other registered method, built with its default knobs, as an ExportedProgram."""
    try:
        folder = _compressed(tmp_path / method, method, {})
    except VitshrinkError as exc:
        pytest.skip(f"{method} does not fit the tiny test model with default knobs: {exc}")
    try:
        result = export_model(str(folder), "exported-program", tmp_path / "m.pt2")
    except VitshrinkError as exc:
        pytest.skip(f"{method} does not support torch.export: {exc}")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


def test_existing_output_and_bad_format(folders: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "model.pt"
    output.write_bytes(b"keep")
    with pytest.raises(VitshrinkError, match="--overwrite"):
        export_model(str(folders["original"]), "torchscript", output)
    assert output.read_bytes() == b"keep"
    result = export_model(str(folders["original"]), "torchscript", output, overwrite=True, batch_size=2)
    assert result.max_abs_diff == 0.0 and output.read_bytes() != b"keep"
    with pytest.raises(VitshrinkError, match="Unknown export format 'tflite'"):
        export_model(str(folders["original"]), "tflite", tmp_path / "m.tflite")
    with pytest.raises(VitshrinkError, match="is a folder"):
        export_model(str(folders["original"]), "torchscript", tmp_path)
    with pytest.raises(VitshrinkError, match="does not exist"):
        export_model(str(folders["original"]), "torchscript", tmp_path / "missing" / "m.pt")


def test_failed_check_writes_nothing(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitshrink.export as export

    real = export._runner

    def off_by_one(fmt: str, path: Path) -> tuple[Any, str]:
        run, name = real(fmt, path)
        return (lambda x: run(x) + 1.0), name

    monkeypatch.setattr(export, "_runner", off_by_one)
    with pytest.raises(VitshrinkError, match="differs from PyTorch by up to 1"):
        export_model(str(folders["original"]), "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_no_check_and_default_output(folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_output(str(folders["dct"]), "onnx") == folders["dct"].parent / "dct.onnx"
    monkeypatch.chdir(tmp_path)
    assert default_output("hf-hub:me/tiny", "exported-program") == tmp_path / "me--tiny.pt2"
    folder = folders["original"]
    result = export_model(str(folder), "torchscript", check=False)
    assert result.path == folder.parent / "original.pt" and result.max_abs_diff is None
    result.path.unlink()


def test_onnx_without_packages_names_the_extra(folders: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnxscript(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(VitshrinkError, match=r"vitshrink\[onnx\]"):
        export_model(str(folders["original"]), "onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.helpers.cli import run_cli
    from vitshrink.cli import app
    from vitshrink.cli_publish import register

    register(app)

    def run(args: list[str]) -> tuple[int, str, str]:
        return run_cli(args, capsys)

    output = tmp_path / "tome.pt2"
    code, out, err = run(["export", str(folders["tome"]), "--format", "exported-program", "--output", str(output)])
    assert code == 0, err
    assert output.is_file() and "max abs diff vs PyTorch" in out and "dynamic" in out
    code, _, err = run(["export", str(folders["tome"]), "--format", "exported-program", "--output", str(output)])
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["export", str(folders["tome"]), "--format", "keras"])
    assert code == 2 and "Unknown export format" in err
