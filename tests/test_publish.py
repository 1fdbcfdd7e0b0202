"""Publishing: the upload folder and model card, the Hub round trip offline, token and failure safety."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml

import vitshrink
from tests.conftest import tiny_vit
from tests.helpers.hub_cache import add_repo_to_cache
from vitshrink.checkpoint import save_compressed
from vitshrink.errors import VitshrinkError
from vitshrink.methods import get_method
from vitshrink.publish import prepare_upload, push, validate_repo_id

FAKE_TOKEN = "hf_FAKEtoken1234567890abcdefSECRET"
REPORT = {
    "created": "2025-01-01T00:00:00+00:00",
    "machine": {"processor": "Test CPU 3000", "cpu_count": 2, "torch_threads": 2, "device": "cpu", "torch": "2.x"},
    "calibration": {"data": "imagenet-val", "train_images": 8},
    "original": {"accuracy": {"top1": 0.75}, "cost": {"params_m": 0.05, "gflops": 0.01},
                 "throughput": {"images_per_second": 1000.0}},
    "compressed": {"accuracy": {"top1": 0.74}, "cost": {"params_m": 0.05, "gflops": 0.008},
                   "throughput": {"images_per_second": 1200.0}},
}


def _inputs() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _output_folder(folder: Path, method: str | None, *, source: str = "deit_tiny", calib: str = "imagenet-val",
                   report: bool = True) -> torch.nn.Module:
    model = tiny_vit()
    methods: list[dict[str, Any]] = []
    if method == "tome":
        tome = get_method("tome")
        params = tome.resolve(model, {"r": 1}, None)
        tome.apply(model, params, None)
        methods = [{"name": "tome", "params": params}]
    save_compressed(model, folder, base_architecture="vit_tiny_patch16_224", methods=methods, source=source,
                    input_size=(3, 32, 32), extra={"calibration": {"data": calib, "images": 8}})
    if report:
        (folder / "report.json").write_text(json.dumps(REPORT))
        (folder / "report.md").write_text("# tiny with tome\n\n| metric | original | compressed |\n| --- | --- | --- |\n"
                                          "| top-1 | 75.00% | 74.00% |\n")
    return model


@pytest.fixture
def tome_out(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path / "tiny-tome"
    return folder, _output_folder(folder, "tome")


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _no_token_anywhere(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            assert FAKE_TOKEN.encode() not in file.read_bytes(), file


def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


# ---------------------------------------------------------------- the upload folder and card
def test_dry_run_writes_upload_folder_and_card(tome_out: tuple[Path, torch.nn.Module]) -> None:
    out_dir, _ = tome_out
    result = push(out_dir, "me/tiny-tome", dry_run=True, token=FAKE_TOKEN)
    assert result.dry_run and result.folder == out_dir.parent / "tiny-tome-upload"
    assert result.files == ["README.md", "config.json", "model.safetensors", "report.json", "report.md"]
    assert sorted(p.name for p in result.folder.iterdir()) == result.files
    assert (result.folder / "model.safetensors").read_bytes() == (out_dir / "model.safetensors").read_bytes()
    card = (result.folder / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["tags"][:3] == ["vitshrink", "image-classification", "timm"] and "tome" in meta["tags"]
    assert meta["base_model"] == "timm/deit_tiny_patch16_224.fb_in1k"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["ILSVRC/imagenet-1k"]
    assert "| `tome` | r | 1 |" in card and "| prop_attn | true |" in card
    assert "| top-1 | 75.00% | 74.00% |" in card and "Test CPU 3000" in card
    assert 'vitshrink.load("hf-hub:me/tiny-tome")' in card and "pip install vitshrink" in card
    assert "timm.create_model(" not in card  # tome needs vitshrink's blocks
    _no_token_anywhere(result.folder)
    # a second dry run replaces the first
    (out_dir / "report.md").unlink()
    again = push(out_dir, "me/tiny-tome", dry_run=True)
    assert "report.md" not in again.files and not (again.folder / "report.md").exists()


def test_card_for_local_source_without_report(tmp_path: Path) -> None:
    out_dir = tmp_path / "local"
    calib = tmp_path / "private" / "calib-images"
    _output_folder(out_dir, "tome", source=str(tmp_path / "weights" / "mine.safetensors"), calib=str(calib),
                   report=False)
    staged = prepare_upload(out_dir, tmp_path / "stage", repo_id="me/local")
    assert [p.name for p in staged] == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "stage" / "README.md").read_text()
    meta = _front_matter(card)
    assert "base_model" not in meta and "license" not in meta and "datasets" not in meta
    assert "`mine.safetensors` (not on the Hub)" in card and "license: not known" in card
    assert str(calib) not in card and "calib-images" in card  # local paths are cut to their last part
    assert "No measurements were published" in card


def test_hub_round_trip_offline(tome_out: tuple[Path, torch.nn.Module], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """push --dry-run folder -> a real Hub cache layout -> vitshrink.load('hf-hub:...') offline."""
    import huggingface_hub.constants as hf_constants

    out_dir, model = tome_out
    result = push(out_dir, "me/tiny-tome", dry_run=True)
    cache = tmp_path / "hub"
    add_repo_to_cache(cache, "me/tiny-tome", result.folder)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    loaded = vitshrink.load("hf-hub:me/tiny-tome")
    assert loaded.vitshrink_config["methods"][0]["name"] == "tome"
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_plain_timm_loads_a_model_without_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    out_dir = tmp_path / "plain"
    model = _output_folder(out_dir, None)
    result = push(out_dir, "me/plain", dry_run=True)
    card = (result.folder / "README.md").read_text()
    assert 'timm.create_model("hf-hub:me/plain", pretrained=True)' in card
    assert 'vitshrink.load("hf-hub:me/plain")' in card
    assert "tags" in _front_matter(card) and "tome" not in _front_matter(card)["tags"]
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
        local = timm.create_model(f"local-dir:{result.folder}", pretrained=True).eval()
        assert torch.equal(local(x), expected)
        cache = tmp_path / "hub"
        add_repo_to_cache(cache, "me/plain", result.folder)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        hub = timm.create_model("hf-hub:me/plain", pretrained=True).eval()
        assert torch.equal(hub(x), expected)
        assert torch.equal(vitshrink.load("hf-hub:me/plain")(x), expected)


# ---------------------------------------------------------------- bad input
def test_missing_files_are_named(tome_out: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    out_dir, _ = tome_out
    (out_dir / "model.safetensors").unlink()
    with pytest.raises(VitshrinkError, match=r"missing model\.safetensors"):
        push(out_dir, "me/x", dry_run=True)
    (out_dir / "config.json").unlink()
    with pytest.raises(VitshrinkError, match=r"missing config\.json, model\.safetensors"):
        prepare_upload(out_dir, tmp_path / "stage")
    with pytest.raises(VitshrinkError, match="not a folder"):
        push(tmp_path / "nowhere", "me/x", dry_run=True)
    assert not (tmp_path / "stage").exists()


@pytest.mark.parametrize(
    "bad", ["noslash", "a/b/c", "-me/x", "me/x-", "me/x..y", "me/x--y", "me/with space", "me/é", "me/" + "x" * 97,
            "me/x.git", "/x"],
)
def test_bad_repo_ids(bad: str) -> None:
    with pytest.raises(VitshrinkError, match="not a valid Hub repository id"):
        validate_repo_id(bad)


def test_good_repo_ids() -> None:
    assert validate_repo_id("my-org/deit_small.tome-v2") == ("my-org", "deit_small.tome-v2")
    assert validate_repo_id("hf-hub:me/x") == ("me", "x")


def test_dry_run_dir_must_be_separate(tome_out: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    out_dir, _ = tome_out
    before = _snapshot(out_dir)
    for target in (out_dir, out_dir / "sub", tmp_path):
        with pytest.raises(VitshrinkError, match="overlaps the output folder"):
            push(out_dir, "me/x", dry_run=True, dry_run_dir=target)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(VitshrinkError, match="notes.txt"):
        push(out_dir, "me/x", dry_run=True, dry_run_dir=other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert _snapshot(out_dir) == before


# ---------------------------------------------------------------- tokens, offline, failures
def _forbid_hub_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no Hub call expected")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", boom)


def test_no_token_is_a_clear_error(tome_out: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    _online(monkeypatch)
    _forbid_hub_calls(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(VitshrinkError, match="hf auth login.*HF_TOKEN"):
        push(tome_out[0], "me/x")


def test_offline_is_a_clear_error(tome_out: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    _forbid_hub_calls(monkeypatch)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VitshrinkError, match="offline.*--dry-run"):
        push(tome_out[0], "me/x", token=FAKE_TOKEN)


@pytest.mark.parametrize("failing", ["create_repo", "upload_folder"])
def test_failed_push_hides_token_and_leaves_output(
    tome_out: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    import huggingface_hub

    _online(monkeypatch)
    out_dir, _ = tome_out
    before = _snapshot(out_dir)
    staged: list[Path] = []

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        assert self.token == FAKE_TOKEN
        if failing == "create_repo":
            raise ConnectionError(f"connection reset while sending Authorization: Bearer {FAKE_TOKEN}")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self: Any, *, folder_path: str, **kwargs: Any) -> None:
        staged.append(Path(folder_path))
        _no_token_anywhere(Path(folder_path))
        assert (Path(folder_path) / "README.md").is_file()
        raise OSError(f"upload interrupted (token {FAKE_TOKEN})")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    with pytest.raises(VitshrinkError) as info:
        push(out_dir, "me/tiny-tome", token=FAKE_TOKEN)
    message = str(info.value)
    assert FAKE_TOKEN not in message and "***" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert _snapshot(out_dir) == before
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["tiny-tome"]  # nothing left beside it
    if failing == "upload_folder":
        assert staged and not staged[0].exists()  # the temporary staging copy is gone


def test_push_calls_the_hub_api(tome_out: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    _online(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls: dict[str, Any] = {}

    class Commit:
        commit_url = "https://huggingface.co/me/tiny-tome/commit/abc"
        pr_url = "https://huggingface.co/me/tiny-tome/discussions/1"

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        calls["create_repo"] = (self.token, repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self: Any, repo_id: str, **kwargs: Any) -> None:
        calls["create_branch"] = (repo_id, kwargs)

    def upload_folder(self: Any, **kwargs: Any) -> Commit:
        calls["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls["upload_folder"] = kwargs
        return Commit()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = push(tome_out[0], "me/tiny-tome", private=True, revision="v1", create_pr=True)
    token, repo_id, kwargs = calls["create_repo"]
    assert token == FAKE_TOKEN and repo_id == "me/tiny-tome"
    assert kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert calls["create_branch"][1]["branch"] == "v1"
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/tiny-tome" and upload["revision"] == "v1" and upload["create_pr"] is True
    assert "tome" in upload["commit_message"] and "token" not in upload
    assert calls["files"] == result.files == ["README.md", "config.json", "model.safetensors", "report.json",
                                              "report.md"]
    assert result.url == Commit.pr_url and not result.dry_run


# ---------------------------------------------------------------- command line
def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from tests.helpers.cli import run_cli
    from vitshrink.cli import app
    from vitshrink.cli_publish import register

    register(app)
    register(app)  # idempotent
    assert sum(1 for c in app.registered_commands if c.name == "push") == 1
    return run_cli(args, capsys)


def test_cli_push(tome_out: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir, _ = tome_out
    code, out, err = _run(["push", str(out_dir), "--repo-id", "me/tiny-tome", "--dry-run", "--dry-run-dir",
                           str(tmp_path / "up"), "--token", FAKE_TOKEN], capsys)
    assert code == 0, err
    assert "README.md" in out and "model.safetensors" in out and "nothing uploaded" in out
    assert FAKE_TOKEN not in out + err
    _no_token_anywhere(tmp_path / "up")
    code, _, err = _run(["push", str(out_dir), "--repo-id", "not a repo", "--dry-run"], capsys)
    assert code == 2 and "not a valid Hub repository id" in err and len(err.strip().splitlines()) == 1
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    code, out, err = _run(["push", str(out_dir), "--repo-id", "me/x", "--token", FAKE_TOKEN], capsys)
    assert code == 2 and "offline" in err and FAKE_TOKEN not in out + err
