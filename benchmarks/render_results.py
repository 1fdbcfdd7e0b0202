"""Render benchmarks/results/*.json into docs/results.md, with each table's command and machine.

    python benchmarks/render_results.py            # rewrites docs/results.md

Every number in docs/results.md comes from a JSON file written by a script in benchmarks/; rerun
that script (the command is printed above each table) to reproduce it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _machine(data: dict[str, Any]) -> str:
    m = data.get("machine", {})
    return (f"{m.get('processor', '?')}, {m.get('cpu_count', '?')} cores, {m.get('torch_threads', '?')} torch threads, "
            f"torch {m.get('torch', '?')}, {data.get('created', '')}")


def _header(data: dict[str, Any]) -> list[str]:
    note = [f"Note: {data['note']}", ""] if data.get("note") else []
    return [f"Command: `{data.get('command', '?')}`", "", f"Machine: {_machine(data)}", "", *note]


def speed_table(data: dict[str, Any]) -> list[str]:
    lines = _header(data) + [
        f"{data['model']}, batch {data['batch_size']}, {data.get('precision', 'fp32')}, {data['rounds']} interleaved "
        "rounds (median img/s; ratios against the original measured in the same run).",
        "",
        "| variant | methods | img/s | throughput ratio | GFLOPs | GFLOPs ratio | batch-1 latency (ms) | latency ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base_gflops = data["rows"][0]["gflops"]
    for row in data["rows"]:
        methods = "; ".join(f"{m['name']} {_short(m['params'])}" for m in row.get("methods", [])) or "-"
        lines.append(
            f"| {row['name']} | {methods} | {row['images_per_second']:.1f} | {row['ratio']:.2f}x | {row['gflops']:.3f} "
            f"| {base_gflops / row['gflops']:.2f}x | {row['latency_ms_batch1']:.1f} | {row['latency_ratio']:.2f}x |"
        )
    return lines


def accuracy_table(data: dict[str, Any]) -> list[str]:
    lines = _header(data) + [
        "Real DeiT-tiny (shared assets), 500 ImageNet dev images split in half: calibration + distillation "
        "fine-tune on one half, top-1 on the other half (images the fine-tune never saw). Speed of the same "
        "configurations: the speed_deit_tiny table (measured on a quiet machine; these accuracy runs shared the "
        "CPU with other jobs, so their wall times are upper bounds).",
        "",
        "| variant | steps | top-1 original | top-1 compressed | points lost | agreement | GFLOPs | fine-tune (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['name']} | {row['steps']} | {100 * row['top1_original']:.1f}% | {100 * row['top1_compressed']:.1f}% "
            f"| {row['top1_lost_points']:.1f} | {100 * row['agreement_top1']:.1f}% | {row['gflops_compressed']:.3f} "
            f"| {row['finetune_seconds']:.0f} |"
        )
    return lines


def bench_table(data: dict[str, Any]) -> list[str]:
    """`vitshrink bench --output` files."""
    settings = data["settings"]
    lines = [f"Command: `vitshrink bench {' '.join(r['name'] for r in data['models'])} --batch-size "
             f"{settings['batch_size']} --rounds {settings['rounds']}" + (" --random-init" if settings.get("random_init") else "")
             + "`", "", f"Machine: {_machine(data)}", "",
             "| model | img/s | ratio to first | GFLOPs | params (M) |", "| --- | --- | --- | --- | --- |"]
    for row in data["models"]:
        lines.append(f"| {row['name']} | {row['images_per_second']:.1f} | {row['ratio']:.2f}x | {row['gflops']:.3f} "
                     f"| {row['params_m']:.2f} |")
    return lines


def dct_init_table(data: dict[str, Any]) -> list[str]:
    sys_path = str(Path(__file__).parent)
    import sys

    sys.path.insert(0, sys_path)
    from dct_init_fashion import table

    cfg = data.get("config", data.get("settings", {}))
    return _header(data) + [
        f"From-scratch training on Fashion-MNIST ({cfg.get('train_images', '?')} training images, "
        f"{cfg.get('epochs', '?')} epochs, test on {cfg.get('test_images', '?')} images), seeds {cfg.get('seeds', '?')}.",
        "", table(data["summary"])]


def analysis_table(data: dict[str, Any]) -> list[str]:
    """`vitshrink analyze` output: per-block similarity across images and effective-rank fraction."""
    a = data["analysis"]
    lines = _header(data) + [
        f"{a['num_images']} images, {a['num_tokens']} tokens; suggested: {a.get('suggested')}.", "",
        "| block | similarity | effective rank / N |", "| --- | --- | --- |"]
    for layer in a["layers"]:
        lines.append(f"| {layer['index']} | {layer['similarity']:.3f} | {layer['effective_rank_fraction']:.3f} |")
    return lines


def _short(params: dict[str, Any]) -> str:
    keep = {k: v for k, v in params.items() if k in ("layers", "tokens", "r", "keep", "basis", "init")}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def main() -> None:
    out = ["# Results", "",
           "Generated by `python benchmarks/render_results.py` from `benchmarks/results/*.json`; each table names "
           "the command that produced it and the machine it ran on.", ""]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        out += [f"## {path.stem}", ""]
        if path.stem.startswith("speed"):
            out += speed_table(data)
        elif path.stem.startswith("accuracy"):
            out += accuracy_table(data)
        elif path.stem.startswith("bench"):
            out += bench_table(data)
        elif path.stem.startswith("dct_init"):
            out += dct_init_table(data)
        elif path.stem.startswith("analysis"):
            out += analysis_table(data)
        out.append("")
    (ROOT / "docs" / "results.md").write_text("\n".join(out))
    print(f"wrote docs/results.md from {len(list(RESULTS.glob('*.json')))} result files")


if __name__ == "__main__":
    main()
