"""Model sources: turn what a user types (a timm name, an alias, `hf-hub:org/name`, a folder, a
`.safetensors` file, the embedded demo model) into a timm model with its ``pretrained_cfg``."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import timm
import torch
from torch import nn

from vitshrink.errors import VitshrinkError

EMBEDDED_DIR = Path(__file__).parent / "embedded"

ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_tiny_distilled": "deit_tiny_distilled_patch16_224",
    "deit_small_distilled": "deit_small_distilled_patch16_224",
    "deit_base_distilled": "deit_base_distilled_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
}
"""Short names users type, shown by ``vitshrink models``."""

EMBEDDED_MODELS: dict[str, Path] = {
    "vitshrink:fashion-vit": EMBEDDED_DIR / "fashion_vit",
}
"""Models shipped inside the package (offline, for demos and tests)."""

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")

_SUPPORTED_HINT = (
    "give a timm name (see `vitshrink models`), hf-hub:org/name, a folder in timm's Hub layout, "
    "or a .safetensors file with --arch"
)


def _register_project_models() -> None:
    """Import vitshrink's own timm model families so their names resolve."""
    try:
        import vitshrink.models  # noqa: F401
    except ImportError:  # the models package is optional while it is being built
        pass


def resolve_name(name: str) -> str:
    """An alias or timm model name -> the timm model name, or a one-line error with close matches."""
    _register_project_models()
    name = ALIASES.get(name, name)
    base = name.split(".", 1)[0]  # timm pretrained tags: deit_small_patch16_224.fb_in1k
    if timm.is_model(base):
        return name
    candidates = list(ALIASES) + timm.list_models() + list(EMBEDDED_MODELS)
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise VitshrinkError(f"Unknown model '{name}': {_SUPPORTED_HINT}.{hint}")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_model(
    source: str | os.PathLike,
    *,
    arch: str | None = None,
    pretrained: bool = True,
    trust_pickle: bool = False,
    num_classes: int | None = None,
) -> nn.Module:
    """Load a model from any supported source, in eval mode on the CPU.

    ``pretrained=False`` builds the architecture with random weights (``--random-init``): useful for
    speed measurements, which do not depend on the weights.
    """
    src = str(source)
    if src in EMBEDDED_MODELS:
        return _load_folder(EMBEDDED_MODELS[src], pretrained=pretrained, trust_pickle=trust_pickle)
    if src.startswith("hf-hub:"):
        return _load_hub(src, pretrained=pretrained)
    if src.startswith("local-dir:"):
        src = src[len("local-dir:") :]
    path = Path(src).expanduser()
    looks_like_path = path.exists() or os.sep in src or src.startswith(".") or path.suffix in (
        ".safetensors",
        *PICKLE_SUFFIXES,
    )
    if looks_like_path:
        if not path.exists():
            raise VitshrinkError(f"Model path '{src}' does not exist: check the path, or {_SUPPORTED_HINT}.")
        if path.is_dir():
            return _load_folder(path, pretrained=pretrained, trust_pickle=trust_pickle)
        return _load_weights_file(path, arch=arch, trust_pickle=trust_pickle, num_classes=num_classes)
    name = resolve_name(src)
    return _create(name, pretrained=pretrained, num_classes=num_classes)


load = load_model


def _create(name: str, *, pretrained: bool, num_classes: int | None = None, **kwargs) -> nn.Module:
    """timm.create_model with the failure modes turned into one-line errors."""
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    if pretrained:
        cfg = timm.models.get_pretrained_cfg(name.split(".", 1)[0])
        has_weights = cfg is not None and any(getattr(cfg, k, None) for k in ("hf_hub_id", "url", "file"))
        if not has_weights and not name.startswith(("hf-hub:", "local-dir:")):
            raise VitshrinkError(
                f"timm has no pretrained weights for '{name}': pass a checkpoint "
                "(a folder, or a .safetensors file with --arch) or use --random-init."
            )
    try:
        model = timm.create_model(name, pretrained=pretrained, **extra, **kwargs)
    except VitshrinkError:
        raise
    except Exception as exc:  # network, cache and checkpoint problems from timm / huggingface_hub
        if pretrained and _is_hub_failure(exc):
            where = "offline (HF_HUB_OFFLINE=1)" if is_offline() else "the Hugging Face Hub is unreachable"
            raise VitshrinkError(
                f"Cannot get pretrained weights for '{name}': {where} and they are not in the local Hub "
                "cache. Use a local checkpoint (a folder, or a .safetensors file with --arch) or "
                "--random-init."
            ) from exc
        raise VitshrinkError(f"Could not build '{name}': {_one_line(exc)}") from exc
    return model.eval()


def _is_hub_failure(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError)):
            return True
        if isinstance(seen, OSError) and ("offline" in str(seen).lower() or "connect" in str(seen).lower()):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_config(folder: Path) -> dict:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise VitshrinkError(
            f"'{folder}' has no config.json, so it is not a folder in timm's Hub layout: "
            "for a bare weights file pass the .safetensors file with --arch."
        )
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VitshrinkError(f"'{cfg_file}' is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}).") from exc


def _load_folder(folder: Path, *, pretrained: bool, trust_pickle: bool) -> nn.Module:
    cfg = _read_config(folder)
    if "vitshrink" in cfg:
        from vitshrink.checkpoint import load_compressed

        return load_compressed(folder, cfg)
    if "architecture" not in cfg:
        raise VitshrinkError(f"'{folder / 'config.json'}' has no 'architecture': it is not a timm model config.")
    _register_project_models()
    if pretrained:
        if not (folder / "model.safetensors").is_file():
            pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if not pickled:
                raise VitshrinkError(f"'{folder}' has config.json but no model.safetensors: add the weights file.")
            if not trust_pickle:
                raise VitshrinkError(
                    f"'{folder}' holds only pickled weights ({pickled[0]}): pickles can run code when loaded. "
                    "Convert it to safetensors, or pass --trust-pickle if you trust the file."
                )
        _check_weights_file(folder / "model.safetensors")
    try:
        model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=pretrained)
    except RuntimeError as exc:
        raise VitshrinkError(f"Weights in '{folder}' do not fit {cfg['architecture']}: {_one_line(exc)}") from exc
    return model.eval()


def _check_weights_file(path: Path) -> None:
    if not path.is_file():
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as exc:
        raise VitshrinkError(
            f"'{path}' is not a readable safetensors file ({_one_line(exc)}): re-download or re-export it."
        ) from exc


def read_state_dict(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a pickle only when the user trusts it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _check_weights_file(path)
        return load_file(str(path), device="cpu")
    if path.suffix in PICKLE_SUFFIXES or path.name.endswith(".pth.tar"):
        if not trust_pickle:
            raise VitshrinkError(
                f"'{path.name}' is a pickled checkpoint, which can run code when loaded: convert it to "
                ".safetensors, or pass --trust-pickle if you trust the file."
            )
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VitshrinkError(f"Could not read '{path}' as a weights-only pickle: {_one_line(exc)}") from exc
        for key in ("state_dict_ema", "state_dict", "model", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise VitshrinkError(f"'{path}' does not hold a state dict of tensors.")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise VitshrinkError(
        f"'{path.name}' is not a checkpoint vitshrink reads: use .safetensors (or a pickle with --trust-pickle)."
    )


def _load_weights_file(
    path: Path, *, arch: str | None, trust_pickle: bool, num_classes: int | None
) -> nn.Module:
    if arch is None:
        raise VitshrinkError(
            f"'{path.name}' holds weights only: say which architecture with --arch, e.g. --arch deit_tiny_patch16_224."
        )
    name = resolve_name(arch)
    state_dict = read_state_dict(path, trust_pickle=trust_pickle)
    if num_classes is None:
        cfg = timm.models.get_pretrained_cfg(name.split(".", 1)[0])
        classifier = getattr(cfg, "classifier", None) or "head"
        head = state_dict.get(f"{classifier}.weight")
        if head is not None:
            num_classes = int(head.shape[0])
    model = _create(name, pretrained=False, num_classes=num_classes)
    load_state_dict_strict(model, state_dict, what=f"'{path.name}'", arch=name)
    return model


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, what: str, arch: str) -> None:
    """Load or fail with one line naming the keys and shapes that do not match."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
        )
    if wrong:
        problems.append(f"wrong shape {len(wrong)} ({', '.join(wrong[:2])}{', ...' if len(wrong) > 2 else ''})")
    if problems:
        raise VitshrinkError(
            f"Keys in {what} do not match {arch}: {'; '.join(problems)}. Check --arch or the checkpoint."
        )
    model.load_state_dict(state_dict, strict=True)


def _load_hub(src: str, *, pretrained: bool) -> nn.Module:
    """`hf-hub:org/name[@revision]`: a vitshrink output repo or a plain timm repo, via the Hub cache."""
    from huggingface_hub import hf_hub_download

    repo = src[len("hf-hub:") :]
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise VitshrinkError(f"'{src}' is not a Hub model id: use hf-hub:org/name.")
    try:
        cfg_path = Path(hf_hub_download(repo_id, "config.json", revision=revision or None))
    except Exception as exc:
        if _is_hub_failure(exc):
            where = "offline (HF_HUB_OFFLINE=1)" if is_offline() else "the Hugging Face Hub is unreachable"
            raise VitshrinkError(
                f"Cannot get '{repo_id}': {where} and it is not in the local Hub cache. "
                "Download it once online, or use a local folder."
            ) from exc
        raise VitshrinkError(f"Cannot get '{repo_id}' from the Hub: {_one_line(exc)}") from exc
    cfg = json.loads(cfg_path.read_text())
    if "vitshrink" in cfg:
        try:
            hf_hub_download(repo_id, "model.safetensors", revision=revision or None)
        except Exception as exc:
            raise VitshrinkError(f"'{repo_id}' has no usable model.safetensors: {_one_line(exc)}") from exc
        from vitshrink.checkpoint import load_compressed

        return load_compressed(cfg_path.parent, cfg)
    _register_project_models()
    return _create(src, pretrained=pretrained)


def describe_sources() -> list[tuple[str, str]]:
    """(alias, timm name) rows for `vitshrink models`, embedded models first."""
    rows = [(name, f"embedded: {path.name}") for name, path in EMBEDDED_MODELS.items()]
    rows += sorted(ALIASES.items())
    return rows
