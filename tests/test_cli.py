"""The command line as a user runs it: reports, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from timm.models._hub import save_for_hf

from tests.conftest import tiny_vit
from tests.helpers.cli import run_cli

run = run_cli


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    save_for_hf(tiny_vit(), tmp_path / "model", safe_serialization=True)
    return tmp_path / "model"


def test_version_and_help(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and "vitshrink 0." in out
    for command in ("eval", "bench", "models", "methods"):
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0 and "Usage" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "--bogus"], "No such option: --bogus"),
        (["eval"], "Missing argument"),
        (["compress", "m", "--calib", "x", "--steps", "-1"], "Invalid value for '--steps'"),
        (["compress", "m", "--calib", "x", "--class-token-weight", "-1"], "Invalid value for '--class-token-weight'"),
        (["bench", "--batch-size", "abc", "m"], "Invalid value for '--batch-size'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert f"vitshrink {args[0]} --help" in lines[0] and "Traceback" not in err + out


def test_eval_writes_report(model_dir: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report_path = tmp_path / "report.json"
    code, out, err = run(
        ["eval", str(model_dir), "--data", str(image_folder), "--reference", str(model_dir), "-q",
         "--runs", "2", "--batch-size", "4", "--output", str(report_path)],
        capsys,
    )
    assert code == 0, err
    report = json.loads(report_path.read_text())
    acc = report["accuracy"]
    assert acc["images"] == 12 and 0 <= acc["top1"] <= 1
    assert acc["agreement_top1"] == 1.0 and acc["kl_to_reference"] == pytest.approx(0, abs=1e-6)
    assert report["cost"]["gflops"] > 0 and report["throughput"]["images_per_second"] > 0
    assert report["memory"]["peak_mb"] > report["memory"]["weights_mb"] > 0
    assert report["machine"]["cpu_count"] >= 1
    assert "| top-1 |" in report_path.with_suffix(".md").read_text()
    # an existing output is refused without --overwrite, and left untouched
    before = report_path.read_bytes()
    code, _, err = run(["eval", str(model_dir), "--no-speed", "--output", str(report_path)], capsys)
    assert code == 2 and "--overwrite" in err and report_path.read_bytes() == before


def test_eval_counts_corrupt_images(model_dir: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (image_folder / "img_000.png").write_bytes(b"broken")
    out_json = tmp_path / "r.json"
    code, _, err = run(["eval", str(model_dir), "--data", str(image_folder), "--no-speed", "-q", "-o", str(out_json)], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["data"]["skipped"] == 1 and report["accuracy"]["images"] == 11


def test_bench_interleaved_ratios(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json = tmp_path / "bench.json"
    code, out, err = run(
        ["bench", "test_vit", "test_vit2", "--random-init", "--rounds", "3", "--warmup", "1", "-b", "2", "-q", "-o", str(out_json)],
        capsys,
    )
    assert code == 0, err
    rows = json.loads(out_json.read_text())["models"]
    assert [r["name"] for r in rows] == ["test_vit", "test_vit2"]
    assert rows[0]["ratio"] == 1.0 and len(rows[1]["run_images_per_second"]) == 3
    assert "test_vit2" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "deit_smal"], "Unknown model"),
        (["eval", "/does/not/exist"], "does not exist"),
        (["bench", "deit_tiny"], "--random-init"),
        (["eval", "test_vit", "--amp", "int3"], "--amp"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_bad_data_is_one_line_exit_2(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run(["eval", str(model_dir), "--data", str(tmp_path / "empty")], capsys)
    assert code == 2 and "No images found" in err


def test_console_script_exit_code(tmp_path: Path) -> None:
    """The installed entry point prints one line and exits 2 (no traceback) on bad input."""
    proc = subprocess.run(
        [sys.executable, "-m", "vitshrink", "eval", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr
