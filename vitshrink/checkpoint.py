"""The vitshrink output folder: a timm Hub-layout checkpoint with a ``vitshrink`` config section.

Written atomically (a temporary sibling folder, renamed into place), never over an existing folder
unless asked, and loadable with :func:`load_compressed` (or ``vitshrink.load``) anywhere.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vitshrink.errors import VitshrinkError

CONFIG_SECTION = "vitshrink"
WEIGHTS_NAME = "model.safetensors"
REQUIRED_FILES = ("config.json", WEIGHTS_NAME)


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an existing output before any work starts."""
    if out_dir.exists() and not overwrite:
        raise VitshrinkError(f"Output '{out_dir}' already exists: choose another --output or pass --overwrite.")
    if out_dir.exists() and not out_dir.is_dir():
        raise VitshrinkError(f"Output '{out_dir}' exists and is not a folder: choose another --output.")


@contextlib.contextmanager
def atomic_dir(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any error the temporary folder is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def model_config(model: nn.Module, vitshrink_section: dict[str, Any]) -> dict[str, Any]:
    """timm's Hub config for ``model`` (architecture, model_args, pretrained_cfg) plus our section."""
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model, str(path))
        cfg = json.loads(path.read_text())
    cfg[CONFIG_SECTION] = json.loads(json.dumps(vitshrink_section, default=_json_default))
    return cfg


def save_compressed(
    model: nn.Module,
    folder: Path,
    *,
    base_architecture: str,
    methods: list[dict[str, Any]],
    source: str,
    input_size: tuple[int, int, int] | list[int],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json`` and ``model.safetensors`` for a rewritten model into ``folder``.

    ``methods`` is ``[{"name": ..., "params": {...}}]`` in application order: enough to rebuild.
    """
    from vitshrink import __version__

    section = {
        "version": __version__,
        "base_architecture": base_architecture,
        "source": source,
        "input_size": list(input_size),
        "methods": methods,
        **(extra or {}),
    }
    cfg = model_config(model, section)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_dedupe_shared(state), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    write_json(folder / "config.json", cfg)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each key its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def build_compressed_structure(cfg: dict[str, Any]) -> nn.Module:
    """The rewritten model's structure with untrained weights, from a vitshrink config."""
    from vitshrink.methods import get_method
    from vitshrink.sources import _register_project_models

    _register_project_models()
    section = cfg[CONFIG_SECTION]
    arch = section.get("base_architecture") or cfg["architecture"]
    from timm.models._hub import _parse_model_cfg

    pretrained_cfg, _, model_args = _parse_model_cfg(json.loads(json.dumps(cfg)), {"source": "vitshrink"})
    model_args = dict(model_args)
    model_args.setdefault("num_classes", cfg.get("num_classes", pretrained_cfg.get("num_classes")))
    try:
        model = timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)
    except Exception as exc:
        raise VitshrinkError(f"Cannot rebuild base architecture '{arch}': {exc}") from exc
    for entry in section.get("methods", []):
        method = get_method(entry["name"])
        method.apply(model, entry["params"], None)
    return model


def load_compressed(folder: Path, cfg: dict[str, Any] | None = None) -> nn.Module:
    """Load a vitshrink output folder (or a Hub snapshot of one) in eval mode."""
    folder = Path(folder)
    if cfg is None:
        cfg = json.loads((folder / "config.json").read_text())
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise VitshrinkError(f"'{folder}' is missing {', '.join(missing)}: it is not a complete vitshrink output.")
    model = build_compressed_structure(cfg)
    try:
        state = load_file(str(folder / WEIGHTS_NAME), device="cpu")
    except Exception as exc:
        raise VitshrinkError(f"'{folder / WEIGHTS_NAME}' is not a readable safetensors file: {exc}") from exc
    from vitshrink.sources import load_state_dict_strict

    load_state_dict_strict(model, state, what=f"'{folder / WEIGHTS_NAME}'", arch=_describe(cfg))
    model.vitshrink_config = cfg[CONFIG_SECTION]
    return model.eval()


def _describe(cfg: dict[str, Any]) -> str:
    section = cfg[CONFIG_SECTION]
    methods = "+".join(m["name"] for m in section.get("methods", [])) or "no methods"
    return f"{section.get('base_architecture', cfg.get('architecture'))} with {methods}"
