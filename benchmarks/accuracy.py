"""Accuracy against speed on the real DeiT-tiny (shared assets): compress, fine-tune, evaluate.

Every variant runs the full `vitshrink compress` pipeline on the 500 dev images: half of them
(a deterministic split) for calibration and the distillation fine-tune, the other half, never seen
by the fine-tune, for evaluation against the original model. The throughput ratio is measured in
the same run (batch 32, fp32, interleaved with the original).

    VITSHRINK_ASSETS=../shared/assets python benchmarks/accuracy.py \
        --variant default=recipe:deit_tiny --variant tome-ft="tome;tome.r=12" --steps 300 --threads 1 \
        --output benchmarks/results/accuracy_deit_tiny.json

`--tome-match NAME` adds ToMe at the speed measured for variant NAME: r is chosen by measuring
(benchmarks/speed.py's machinery), then ToMe runs off the shelf (no fine-tune) and fine-tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vitshrink.compress import CompressConfig, compress
from vitshrink.finetune import FinetuneConfig

sys.path.insert(0, str(Path(__file__).parent))
from speed import build_variant, parse_variant  # noqa: E402


def run_variant(name: str, method: str, knobs: dict, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    assets = Path(args.assets)
    with tempfile.TemporaryDirectory() as tmp:
        config = CompressConfig(
            model=str(assets / "deit_tiny_patch16_224.safetensors"), arch="deit_tiny_patch16_224",
            method=method, knobs=knobs, calib=str(assets / "imagenet-sample-dev"), eval_fraction=0.5,
            analysis_images=args.analysis_images,
            finetune=FinetuneConfig(steps=steps, lr=args.lr, batch_size=args.batch_size, seed=0,
                                    temperature=args.temperature, class_token_weight=args.class_token_weight),
            output=Path(tmp) / name, bench_batch_size=32, bench_rounds=args.rounds, speed=not args.no_speed,
        )
        start = time.perf_counter()
        report = compress(config, progress=not args.quiet).report
        wall = time.perf_counter() - start
    acc_o, acc_c = report["original"]["accuracy"], report["compressed"]["accuracy"]
    row = {
        "name": name, "method": method, "params": report["methods"], "steps": steps,
        "top1_original": acc_o["top1"], "top1_compressed": acc_c["top1"],
        "top1_lost_points": 100 * (acc_o["top1"] - acc_c["top1"]),
        "agreement_top1": acc_c["agreement_top1"], "kl_to_reference": acc_c["kl_to_reference"],
        "eval_images": report["evaluation"]["images"], "train_images": report["calibration"]["train_images"],
        "speed_ratio": report["speed"]["ratio"] if "speed" in report else None,
        "latency_ratio": report["speed"]["latency_ratio"] if "speed" in report else None,
        "gflops_original": report["original"]["cost"]["gflops"], "gflops_compressed": report["compressed"]["cost"]["gflops"],
        "finetune_seconds": report["finetune"].get("seconds", 0.0), "wall_seconds": wall,
    }
    print(f"{name}: top-1 {100 * row['top1_original']:.1f} -> {100 * row['top1_compressed']:.1f} "
          f"({row['top1_lost_points']:+.1f} pts lost), agreement {100 * row['agreement_top1']:.1f}%, "
          f"speed {row['speed_ratio'] or 0:.2f}x, GFLOPs {row['gflops_compressed']:.3f}/{row['gflops_original']:.3f}, "
          f"fine-tune {row['finetune_seconds']:.0f}s", flush=True)
    return row


def match_tome_r(target_ratio: float, rounds: int) -> tuple[int, float]:
    """Smallest ToMe r on DeiT-tiny whose measured throughput ratio reaches ``target_ratio``."""
    from vitshrink.bench import bench
    from vitshrink.measure import RunSettings, input_size_of
    from vitshrink.sources import load_model

    base = load_model("deit_tiny", pretrained=False)
    size = input_size_of(base)
    calib = torch.randn(8, *size)
    candidates = [8, 10, 12, 14, 16]
    models = [("original", base, size)] + [
        (f"r{r}", build_variant(base, "tome", {"tome": {"r": r}}, calib)[0], size) for r in candidates
    ]
    rows = bench(models, RunSettings(), batch_size=32, rounds=rounds, progress=False)
    ratios = {r: row.ratio for r, row in zip(candidates, rows[1:], strict=True)}
    print("ToMe ratios:", {r: round(v, 2) for r, v in ratios.items()}, flush=True)
    best = min(candidates, key=lambda r: abs(ratios[r] - target_ratio))
    return best, ratios[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=os.environ.get("VITSHRINK_ASSETS", "../shared/assets"))
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--class-token-weight", type=float, default=1.0,
                        help="weight of matching the teacher's class token after every block (0: logits only)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--analysis-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tome-match", default=None, help="variant whose measured speed ToMe is matched to")
    parser.add_argument("--tome-r", type=int, default=None, help="run ToMe (off the shelf and fine-tuned) with this r")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the in-run throughput comparison (take speed from benchmarks/speed.py on a quiet machine)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not (Path(args.assets) / "deit_tiny_patch16_224.safetensors").is_file():
        sys.exit(f"error: no DeiT-tiny weights under {args.assets}: set VITSHRINK_ASSETS to ../shared/assets.")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for text in args.variant:
        name, method, knobs = parse_variant(text)
        rows.append(run_variant(name, method, knobs, args, args.steps))
        _save(args, rows)
    if args.tome_match or args.tome_r:
        if args.tome_r:
            r = args.tome_r
        else:
            target = next(r for r in rows if r["name"] == args.tome_match)["speed_ratio"]
            r, ratio = match_tome_r(target, args.rounds)
            print(f"ToMe r={r} measured {ratio:.2f}x against {args.tome_match}'s {target:.2f}x", flush=True)
        rows.append(run_variant(f"tome-r{r}-off-the-shelf", "tome", {"tome": {"r": r}}, args, 0))
        _save(args, rows)
        rows.append(run_variant(f"tome-r{r}-fine-tuned", "tome", {"tome": {"r": r}}, args, args.steps))
        _save(args, rows)


def _save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if not args.output:
        return
    from vitshrink.report import machine_info, now_iso

    args.output.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:]), "created": now_iso(),
            "machine": machine_info(), "rows": rows}
    args.output.write_text(json.dumps(data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
