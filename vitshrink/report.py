"""Reports: what was measured, on which machine, as JSON and as a Markdown table."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

import torch

from vitshrink.checkpoint import write_json


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where a measurement was taken: enough to judge and reproduce it."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


METRICS: list[tuple[str, str, str]] = [
    ("top1", "top-1", "pct"),
    ("top5", "top-5", "pct"),
    ("agreement_top1", "top-1 agreement with reference", "pct"),
    ("kl_to_reference", "mean KL to reference (nats)", ""),
    ("params_m", "parameters (M)", ""),
    ("gflops", "GFLOPs (multiply-adds)", ""),
    ("images_per_second", "throughput (img/s)", ""),
    ("latency_ms_batch1", "batch-1 latency (ms)", ""),
    ("peak_mb", "peak memory (MB)", ""),
]


def flat_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an eval report in one flat dict."""
    flat: dict[str, Any] = {}
    flat.update(report.get("accuracy") or {})
    flat.update(report.get("cost") or {})
    flat.update(report.get("throughput") or {})
    flat.update(report.get("memory") or {})
    return flat


def eval_markdown(report: dict[str, Any]) -> str:
    """Markdown for one model's eval report (`vitshrink eval`)."""
    flat = flat_metrics(report)
    rows = [[label, _fmt(flat.get(key), kind)] for key, label, kind in METRICS if flat.get(key) is not None]
    if (ref := flat.get("reference_top1")) is not None:
        rows.insert(1, ["reference top-1", _fmt(ref, "pct")])
    model = report.get("model", {})
    data = report.get("data", {})
    machine = report.get("machine", {})
    tp = report.get("throughput") or {}
    lines = [
        f"# vitshrink eval: {model.get('source', '?')}",
        "",
        f"Data: `{data.get('source', '-')}` ({data.get('images', 0)} images"
        + (f", {data['skipped']} unreadable skipped" if data.get("skipped") else "")
        + ")" + (f"; reference: `{report['reference']['source']}`" if report.get("reference") else ""),
        "",
        markdown_table(["metric", "value"], rows),
        "",
        f"Measured on {machine.get('processor', '?')} ({machine.get('cpu_count', '?')} cores, "
        f"{machine.get('torch_threads', '?')} torch threads), device {machine.get('device', '?')}, "
        f"torch {machine.get('torch', '?')}"
        + (f", batch size {tp.get('batch_size')}" if tp else "")
        + f", {report.get('created', '')}.",
    ]
    return "\n".join(lines) + "\n"


def comparison_markdown(title: str, columns: list[tuple[str, dict[str, Any]]], note: str = "") -> str:
    """Markdown table with one column per model (e.g. original vs compressed)."""
    rows = []
    for key, label, kind in METRICS:
        values = [flat.get(key) for _, flat in columns]
        if all(v is None for v in values):
            continue
        rows.append([label] + [_fmt(v, kind) for v in values])
    text = f"# {title}\n\n" + markdown_table(["metric"] + [name for name, _ in columns], rows) + "\n"
    return text + (f"\n{note}\n" if note else "")


def write_report(folder: Path, report: dict[str, Any], markdown: str, stem: str = "report") -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
    write_json(json_path, report)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(markdown)
    tmp.replace(md_path)
    return json_path, md_path
