"""Publishing: push a vitshrink output folder to the Hugging Face Hub with a generated model card.

The upload is made from a temporary staging copy, so the output folder itself is never modified (an
interrupted upload leaves it as it was). ``push(..., dry_run=True)`` writes that exact staging folder
to disk instead and touches no network. The token is only handed to :class:`huggingface_hub.HfApi`:
it is never printed, written to a file, or kept in an error message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitshrink.checkpoint import CONFIG_SECTION, REQUIRED_FILES, atomic_dir
from vitshrink.errors import VitshrinkError

OPTIONAL_FILES = ("report.json", "report.md", "analysis.json", "analysis.png")
"""Copied into the upload when the output folder has them."""
UPLOAD_FILES = (*REQUIRED_FILES, *OPTIONAL_FILES)
CARD_NAME = "README.md"

_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^(?P<org>{_NAME_PART})/(?P<name>{_NAME_PART})$")
_MAX_NAME = 96


@dataclass
class PushResult:
    """What :func:`push` uploaded (or, for a dry run, wrote to ``folder``)."""

    repo_id: str
    files: list[str]
    """File names relative to the repository root, sorted."""
    dry_run: bool
    folder: Path | None = None
    """The dry-run folder (None for a real upload)."""
    url: str | None = None
    """The repository (or pull request) URL after an upload."""
    commit_url: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    """Bytes per file."""


# ---------------------------------------------------------------- repo ids
def validate_repo_id(repo_id: str) -> tuple[str, str]:
    """``org/name`` under the Hub's rules (letters, digits, ``-``, ``_``, ``.``), or a one-line error."""
    text = str(repo_id).strip()
    if text.startswith("hf-hub:"):
        text = text[len("hf-hub:") :]
    match = _REPO_ID.match(text)
    problem = None
    if match is None:
        problem = (
            "use org/name (or user/name) with letters, digits, '-', '_' and '.', not starting or ending "
            "with '-' or '.'"
        )
    elif "--" in text or ".." in text:
        problem = "'--' and '..' are not allowed"
    elif len(match["name"]) > _MAX_NAME:
        problem = f"the name part is longer than {_MAX_NAME} characters"
    elif match["name"].endswith(".git"):
        problem = "the name must not end with '.git'"
    if problem:
        raise VitshrinkError(f"'{repo_id}' is not a valid Hub repository id: {problem}, e.g. my-org/deit-small-tome.")
    assert match is not None
    return match["org"], match["name"]


# ---------------------------------------------------------------- reading the output folder
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VitshrinkError(f"'{path}' is not readable JSON ({exc}): fix it or remove it from the folder.") from exc
    if not isinstance(data, dict):
        raise VitshrinkError(f"'{path}' does not hold a JSON object.")
    return data


def check_output_folder(out_dir: Path) -> dict[str, Any]:
    """The folder's config.json, after checking the files an upload needs are there and readable."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise VitshrinkError(f"'{out_dir}' is not a folder: give a vitshrink output folder (from `vitshrink compress`).")
    missing = [name for name in REQUIRED_FILES if not (out_dir / name).is_file()]
    if missing:
        raise VitshrinkError(
            f"'{out_dir}' is missing {', '.join(missing)}: push needs a complete vitshrink output folder."
        )
    cfg = _read_json(out_dir / "config.json")
    if "architecture" not in cfg:
        raise VitshrinkError(f"'{out_dir / 'config.json'}' has no 'architecture': it is not a timm model config.")
    from vitshrink.sources import _check_weights_file

    _check_weights_file(out_dir / "model.safetensors")
    return cfg


def _section(cfg: dict[str, Any]) -> dict[str, Any]:
    section = cfg.get(CONFIG_SECTION)
    return section if isinstance(section, dict) else {}


def _methods(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    methods = _section(cfg).get("methods") or []
    return [m for m in methods if isinstance(m, dict) and m.get("name")]


def needs_vitshrink(cfg: dict[str, Any]) -> bool:
    """True when rebuilding the model needs vitshrink's modules (methods, or a vitshrink timm family)."""
    if _methods(cfg):
        return True
    arch = _section(cfg).get("base_architecture") or cfg.get("architecture")
    try:
        import timm

        from vitshrink.sources import _register_project_models

        _register_project_models()
        return str(timm.models.model_entrypoint(str(arch)).__module__).startswith("vitshrink")
    except Exception:  # unknown architecture: plain timm cannot build it either
        return True


def _looks_like_path(source: str) -> bool:
    from vitshrink.sources import EMBEDDED_MODELS, PICKLE_SUFFIXES

    return (
        source in EMBEDDED_MODELS
        or source.startswith(("local-dir:", ".", "/", "~"))
        or "/" in source
        or os.sep in source
        or Path(source).suffix in (".safetensors", *PICKLE_SUFFIXES)
    )


def base_model_id(cfg: dict[str, Any]) -> str | None:
    """The Hub id of the model that was compressed, when the config tells it (None for local files)."""
    section = _section(cfg)
    source = str(section.get("source") or "")
    if section.get("random_init") or section.get("pretrained") is False or not source:
        return None
    if source.startswith("hf-hub:"):
        repo = source[len("hf-hub:") :].partition("@")[0]
        return repo if _REPO_ID.match(repo) else None
    if _looks_like_path(source):
        return None
    from vitshrink.sources import resolve_name

    try:
        name = resolve_name(source)
    except VitshrinkError:
        return None
    import timm

    arch, _, tag = name.partition(".")
    if not tag and (section.get("base_architecture") or cfg.get("architecture")) == arch:
        tag = str((cfg.get("pretrained_cfg") or {}).get("tag") or "")
    try:
        pretrained = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError:  # a tag timm does not know for this architecture
        return None
    hub_id = getattr(pretrained, "hf_hub_id", None) if pretrained is not None else None
    if hub_id and hub_id != "timm/":
        return str(hub_id)
    return f"timm/{arch}.{tag}" if tag else None


def _license(cfg: dict[str, Any], base: str | None) -> str | None:
    """The base model's licence from its pretrained_cfg, when the base is known."""
    if base is None:
        return None
    value = (cfg.get("pretrained_cfg") or {}).get("license")
    if not value and base.startswith("timm/"):
        import timm

        pretrained = timm.models.get_pretrained_cfg(base[len("timm/") :])
        value = getattr(pretrained, "license", None) if pretrained is not None else None
    return str(value) if value else None


def _calibration_data(cfg: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    """Calibration data strings as given to compress (config section first, then report.json)."""
    found: list[str] = []
    calib = _section(cfg).get("calibration")
    candidates: list[Any] = [calib.get("data") if isinstance(calib, dict) else calib]
    rep_calib = (report or {}).get("calibration")
    candidates.append(rep_calib.get("data") if isinstance(rep_calib, dict) else rep_calib)
    for value in candidates:
        if isinstance(value, str) and value and value not in found:
            found.append(value)
    return found


def _dataset_id(data: str) -> str | None:
    """The Hub dataset id behind a data string (an alias with a Hub id, or org/name), else None."""
    from vitshrink.data import ALIASES

    if data in ALIASES:
        return ALIASES[data].hub_id
    if data.startswith(("/", ".", "~")) or Path(data).expanduser().exists():
        return None
    return data if _REPO_ID.match(data) else None


def _data_label(data: str) -> str:
    """How calibration data is named in the card: local paths are cut to their last part."""
    if _dataset_id(data) is not None or not ("/" in data or os.sep in data):
        return f"`{data}`"
    return f"a local image folder (`{Path(data).name}`)"


# ---------------------------------------------------------------- the model card
def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > 120:
        text = text[:117] + "..."
    return text.replace("|", "\\|")


def _fmt(value: Any, kind: str = "") -> str:
    from vitshrink.report import _fmt as fmt

    return fmt(value, kind)


def _results_table(report: dict[str, Any]) -> str | None:
    """original vs compressed from report.json (compress layout); None when it holds no numbers."""
    from vitshrink.report import METRICS, markdown_table

    columns = []
    for key in ("original", "compressed"):
        part = report.get(key)
        if isinstance(part, dict):
            flat: dict[str, Any] = {}
            for sub in ("accuracy", "cost", "throughput", "memory"):
                if isinstance(part.get(sub), dict):
                    flat.update(part[sub])
            columns.append((key, flat))
    if not columns:
        return None
    rows = []
    for key, label, kind in METRICS:
        values = [flat.get(key) for _, flat in columns]
        if any(v is not None for v in values):
            rows.append([label] + [_fmt(v, kind) for v in values])
    if not rows:
        return None
    return markdown_table(["metric"] + [name for name, _ in columns], rows)


def _demote_headings(markdown: str, levels: int = 2) -> str:
    lines = []
    for line in markdown.strip().splitlines():
        if re.match(r"^#{1,4} ", line):
            line = "#" * levels + line
        lines.append(line)
    return "\n".join(lines)


def _machine_line(machine: dict[str, Any]) -> str:
    parts = [str(machine.get("gpu") or machine.get("processor") or "unknown processor")]
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} CPU cores")
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} torch threads")
    if machine.get("device"):
        parts.append(f"device {machine['device']}")
    for lib in ("torch", "timm"):
        if machine.get(lib):
            parts.append(f"{lib} {machine[lib]}")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    return ", ".join(parts)


def render_model_card(
    cfg: dict[str, Any],
    *,
    repo_id: str | None = None,
    report: dict[str, Any] | None = None,
    report_md: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md for a Hub repository holding this vitshrink output (front matter + body)."""
    section = _section(cfg)
    methods = _methods(cfg)
    method_names = [str(m["name"]) for m in methods]
    arch = str(section.get("base_architecture") or cfg.get("architecture"))
    base = base_model_id(cfg)
    lic = license or _license(cfg, base)
    data = _calibration_data(cfg, report)
    datasets = [d for d in (_dataset_id(x) for x in data) if d]
    hub_name = repo_id or "ORG/NAME"
    plain_timm = not needs_vitshrink(cfg)

    meta: dict[str, Any] = {"library_name": "timm"}
    if lic:
        meta["license"] = lic
    tags = ["vitshrink", "image-classification", "timm"]
    meta["tags"] = tags + [n for n in method_names if n not in tags]
    if base:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "image-classification"
    front = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False).strip()

    title = repo_id.split("/", 1)[1] if repo_id else f"{arch} ({'+'.join(method_names) or 'vitshrink'})"
    lines = ["---", front, "---", "", f"# {title}", ""]
    how = "compressed after training with vitshrink"
    if method_names:
        how += " using " + " + ".join(f"`{n}`" for n in method_names)
    base_text = f"[`{base}`](https://huggingface.co/{base})" if base else f"`{arch}`"
    lines.append(f"An image classifier: {base_text} {how}.")
    lines.append("")
    facts = [f"- architecture: `{arch}`"]
    if cfg.get("num_classes") is not None:
        facts.append(f"- classes: {cfg['num_classes']}")
    if section.get("input_size"):
        facts.append(f"- input size: {'x'.join(str(v) for v in section['input_size'])}")
    if base is None and section.get("source"):
        facts.append(f"- base weights: `{Path(str(section['source'])).name}` (not on the Hub)")
    if section.get("version"):
        facts.append(f"- vitshrink version: {section['version']}")
    if data:
        facts.append("- calibration data: " + ", ".join(_data_label(d) for d in data))
    if not lic:
        facts.append("- license: not known (the base weights' licence applies; set `license` in this card)")
    lines += facts + [""]

    lines += ["## Methods", ""]
    if methods:
        lines += ["Applied in this order:", "", "| method | parameter | value |", "| --- | --- | --- |"]
        for m in methods:
            params = m.get("params") or {}
            if not params:
                lines.append(f"| `{m['name']}` | | |")
            for i, (key, value) in enumerate(params.items()):
                label = f"`{m['name']}`" if i == 0 else ""
                lines.append(f"| {label} | {key} | {_cell(value)} |")
    else:
        lines.append("None: the weights are a plain timm model (e.g. an uncompressed or converted export).")
    lines.append("")

    lines += ["## Measured results", ""]
    table = _results_table(report) if report else None
    if report_md:
        lines += [_demote_headings(report_md), ""]
    elif table:
        lines += [table, ""]
    machine = (report or {}).get("machine")
    if isinstance(machine, dict) and machine:
        when = f" ({report['created']})" if report and report.get("created") else ""
        lines += [f"Measured on: {_machine_line(machine)}{when}.", ""]
    if report_md or table:
        lines += ["Speed depends on the hardware, batch size and precision: measure on yours with `vitshrink bench`.", ""]
    else:
        lines += ["No measurements were published with this model (no report.json).", ""]

    lines += ["## Usage", ""]
    if plain_timm:
        lines += [
            "This model needs nothing beyond timm:",
            "",
            "```python",
            "import timm",
            "",
            f'model = timm.create_model("hf-hub:{hub_name}", pretrained=True).eval()',
            "```",
            "",
            "or with vitshrink:",
            "",
        ]
    else:
        what = ", ".join(f"`{n}`" for n in method_names) or f"the `{arch}` model family"
        lines += [f"This model uses vitshrink's modules ({what}), so load it with vitshrink:", ""]
    lines += [
        "```bash",
        "pip install vitshrink",
        "```",
        "",
        "```python",
        "import timm",
        "import torch",
        "import vitshrink",
        "",
        f'model = vitshrink.load("hf-hub:{hub_name}")',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        "with torch.no_grad():",
        "    logits = model(transform(image).unsqueeze(0))  # image: a PIL image",
        "```",
        "",
        "Export for deployment, checked against PyTorch (max abs difference printed):",
        "",
        "```bash",
        f"vitshrink export hf-hub:{hub_name} --format onnx --output model.onnx",
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- staging and upload
def prepare_upload(
    out_dir: Path, staging: Path, *, repo_id: str | None = None, license: str | None = None
) -> list[Path]:
    """Copy the publishable files of ``out_dir`` into ``staging`` and write the model card there.

    Returns the staged files. ``out_dir`` is only read.
    """
    out_dir = Path(out_dir)
    staging = Path(staging)
    cfg = check_output_folder(out_dir)
    report = _read_json(out_dir / "report.json") if (out_dir / "report.json").is_file() else None
    report_md = (out_dir / "report.md").read_text() if (out_dir / "report.md").is_file() else None
    staging.mkdir(parents=True, exist_ok=True)
    files = []
    for name in UPLOAD_FILES:
        src = out_dir / name
        if src.is_file():
            shutil.copyfile(src, staging / name)
            files.append(staging / name)
    card = render_model_card(cfg, repo_id=repo_id, report=report, report_md=report_md, license=license)
    (staging / CARD_NAME).write_text(card)
    files.append(staging / CARD_NAME)
    return sorted(files)


def default_dry_run_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}-upload"


def _check_dry_run_dir(folder: Path, out_dir: Path) -> None:
    """Refuse a dry-run folder that is (or holds, or is inside) the output, or holds other files."""
    target, source = folder.resolve(), out_dir.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise VitshrinkError(
            f"--dry-run-dir '{folder}' overlaps the output folder '{out_dir}': choose a separate folder."
        )
    if folder.exists():
        if not folder.is_dir():
            raise VitshrinkError(f"--dry-run-dir '{folder}' exists and is not a folder: choose another.")
        own = {*UPLOAD_FILES, CARD_NAME}
        other = sorted(p.name for p in folder.iterdir() if p.name not in own or not p.is_file())
        if other:
            raise VitshrinkError(
                f"--dry-run-dir '{folder}' holds files a dry run did not write ({', '.join(other[:3])}): "
                "choose an empty or new folder."
            )


def _offline() -> bool:
    from huggingface_hub import constants

    from vitshrink.sources import is_offline

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or is_offline()


def _resolve_token(token: str | None) -> str:
    if token:
        return token
    import huggingface_hub

    found = os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not found:
        raise VitshrinkError(
            "No Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with write access)."
        )
    return found


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _upload_error(exc: BaseException, repo_id: str, token: str, step: str) -> VitshrinkError:
    lines = str(exc).strip().splitlines()
    first = _scrub(lines[0] if lines else type(exc).__name__, token)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    hint = ""
    if status in (401, 403):
        hint = " Check that the token has write access to this namespace (`hf auth login`)."
    elif status is None and isinstance(exc, (ConnectionError, OSError)):
        hint = " Check the network connection and try again."
    return VitshrinkError(f"Could not {step} '{repo_id}' on the Hub ({type(exc).__name__}): {first}.{hint}")


def push(
    out_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    dry_run: bool = False,
    dry_run_dir: Path | None = None,
    license: str | None = None,
) -> PushResult:
    """Upload ``out_dir`` (config, weights, reports, a generated model card) to the Hub repo ``repo_id``.

    With ``dry_run`` the exact folder that would be uploaded is written to ``dry_run_dir`` (default
    ``<out_dir>-upload`` beside it, replacing a previous dry run) and nothing goes over the network.
    """
    out_dir = Path(out_dir)
    org, name = validate_repo_id(repo_id)
    repo_id = f"{org}/{name}"
    check_output_folder(out_dir)

    if dry_run:
        folder = Path(dry_run_dir) if dry_run_dir is not None else default_dry_run_dir(out_dir)
        _check_dry_run_dir(folder, out_dir)
        with atomic_dir(folder, overwrite=True) as tmp:
            staged = prepare_upload(out_dir, tmp, repo_id=repo_id, license=license)
            sizes = {p.name: p.stat().st_size for p in staged}
        return PushResult(repo_id, sorted(sizes), True, folder=folder, sizes=sizes)

    if _offline():
        raise VitshrinkError(
            "Cannot push: the Hub is offline (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE, or use --dry-run to "
            "write the upload folder without uploading."
        )
    secret = _resolve_token(token)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="vitshrink-push-") as tmp:
        staged = prepare_upload(out_dir, Path(tmp), repo_id=repo_id, license=license)
        sizes = {p.name: p.stat().st_size for p in staged}
        api = HfApi(token=secret)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        except Exception as exc:
            raise _upload_error(exc, repo_id, secret, "create") from None
        try:
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            methods = "+".join(m["name"] for m in _methods(_read_json(out_dir / "config.json"))) or "no methods"
            commit = api.upload_folder(
                folder_path=tmp,
                repo_id=repo_id,
                repo_type="model",
                revision=revision,
                create_pr=create_pr,
                commit_message=f"Upload {out_dir.name} ({methods}) with vitshrink",
            )
        except Exception as exc:
            raise _upload_error(exc, repo_id, secret, "upload to") from None
    url = getattr(commit, "pr_url", None) or str(repo_url)
    return PushResult(
        repo_id, sorted(sizes), False, url=url, commit_url=getattr(commit, "commit_url", None), sizes=sizes
    )
