"""Throughput, batch-1 latency and GFLOPs of compressed variants against the original timm model.

All variants and the original are measured in ONE interleaved run (vitshrink.bench), so the
ratios are immune to machine drift. Weights are random (speed does not depend on them); methods
are initialised from random calibration images.

    python benchmarks/speed.py --model deit_small \
        --variant default=recipe:deit_small \
        --variant tome-r13="tome;tome.r=13" \
        --batch-size 32 --rounds 10 --output benchmarks/results/speed_deit_small.json

A variant is NAME=recipe:RECIPE or NAME="METHODS;method.knob=value;...".
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from vitshrink.bench import bench
from vitshrink.compress import apply_methods
from vitshrink.measure import RunSettings, input_size_of, measure_throughput
from vitshrink.methods import CalibrationContext, parse_method_string
from vitshrink.recipes import load_recipe
from vitshrink.report import machine_info, now_iso
from vitshrink.sources import load_model


def parse_variant(text: str) -> tuple[str, str, dict[str, dict[str, Any]]]:
    name, _, spec = text.partition("=")
    if spec.startswith("recipe:"):
        recipe = load_recipe(spec[len("recipe:"):])
        return name, recipe["method"], {k: dict(v or {}) for k, v in (recipe.get("knobs") or {}).items()}
    method, *settings = [part.strip() for part in spec.split(";") if part.strip()]
    knobs: dict[str, dict[str, Any]] = {}
    for item in settings:
        key, _, value = item.partition("=")
        m, _, knob = key.partition(".")
        knobs.setdefault(m, {})[knob] = yaml.safe_load(value)
    return name, method, knobs


def build_variant(base: torch.nn.Module, method: str, knobs: dict[str, dict[str, Any]], calib: torch.Tensor) -> tuple[torch.nn.Module, list]:
    model = copy.deepcopy(base)
    analysis = None
    names = parse_method_string(method)
    if {"dgssa", "glad"} & set(names):
        from vitshrink.analysis import analyze_attention

        with torch.inference_mode():
            analysis = analyze_attention(base, calib, batch_size=16)
    applied = apply_methods(model, names, knobs, CalibrationContext(images=calib, analysis=analysis, batch_size=16))
    return model.eval(), applied


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--variant", action="append", default=[], help="NAME=recipe:RECIPE or NAME='METHODS;m.knob=v'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--calib-images", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = load_model(args.model, pretrained=False)
    size = input_size_of(base)
    calib = torch.randn(args.calib_images, *size)
    models = [("original", base, size)]
    applied = {}
    for text in args.variant:
        name, method, knobs = parse_variant(text)
        model, applied[name] = build_variant(base, method, knobs, calib)
        models.append((name, model, size))
    settings = RunSettings()
    rows = bench(models, settings, batch_size=args.batch_size, rounds=args.rounds, progress=False)
    latencies = {}
    for name, model, _ in models:
        lat = measure_throughput(model, size, settings, batch_size=1, runs=10, warmup=3, latency=False)
        latencies[name] = 1e3 / lat.images_per_second
    result = {
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "created": now_iso(),
        "machine": machine_info(),
        "model": args.model,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "precision": "fp32",
        "rows": [
            {**row.to_dict(), "latency_ms_batch1": latencies[row.name],
             "latency_ratio": latencies["original"] / latencies[row.name],
             "spread": statistics.pstdev(row.run_images_per_second) / row.images_per_second,
             "methods": applied.get(row.name, [])}
            for row in rows
        ],
    }
    print(f"{args.model}, batch {args.batch_size}, fp32, {result['machine']['processor']} "
          f"({result['machine']['cpu_count']} cores, {torch.get_num_threads()} threads), {args.rounds} interleaved rounds")
    print(f"{'variant':<22}{'img/s':>9}{'ratio':>8}{'GFLOPs':>9}{'lat ms':>9}{'lat x':>7}")
    for row in result["rows"]:
        print(f"{row['name']:<22}{row['images_per_second']:>9.1f}{row['ratio']:>7.2f}x{row['gflops']:>9.3f}"
              f"{row['latency_ms_batch1']:>9.1f}{row['latency_ratio']:>6.2f}x")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
