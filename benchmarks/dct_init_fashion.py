"""Does DCT initialisation help a small ViT trained from scratch? Fashion-MNIST, several inits and seeds.

Trains the embedded reference model's setting (timm ``VisionTransformer``, patch 4 on 32x32 RGB
inputs: an 8x8 token grid plus a class token), smaller and shorter: by default width 96, depth 4,
3 heads, 3 epochs over a fixed 10,000-image class-mixed subset of the training set, then measures top-1
on the full 10,000-image test set. For each ``--inits`` value (``none``: timm's random init;
``q``/``k``/``v``/``qkv``: that block of every attention's qkv weight set to the orthonormal DCT-II
matrix with :func:`vitshrink.dct_init.apply_dct_init`, Pan et al., arXiv 2405.13901) and each seed it
trains one model. A seed fixes the random init of every other weight, the data order and the
augmentation, so runs with the same seed differ only in the DCT-initialised block (paired runs).

Preprocessing follows ``benchmarks/train_reference.py``: grey -> RGB, bilinear resize 28 -> 32,
normalised with the Fashion-MNIST grey mean/std; training adds a random crop (padding 4) and a
horizontal flip. Optimiser: AdamW, linear warm-up then cosine decay, label smoothing 0.1, gradient
clipping at 1.0. Prints a table (mean and std of the test accuracy per init, and the mean paired
difference to ``none``) and writes JSON with every run, the command and the machine.

    .venv/bin/python benchmarks/dct_init_fashion.py --inits none,q,k,v,qkv --seeds 0,1,2 \\
        --output benchmarks/results/dct_init_fashion.json
    .venv/bin/python benchmarks/dct_init_fashion.py --train-images 500 --test-images 500 --epochs 1 \\
        --seeds 0 --inits none,q --output /tmp/dct_init_smoke.json          # smoke test, seconds
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from vitshrink.checkpoint import write_json
from vitshrink.dct_init import apply_dct_init
from vitshrink.report import machine_info, now_iso

HERE = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
GREY_MEAN, GREY_STD = 0.2860, 0.3530  # as in train_reference.py
INITS = ("none", "q", "k", "v", "qkv")
SUBSET_SEED = 12345  # the training subset is the same for every run

sys.path.insert(0, str(HERE))
from train_reference import augment, load_fashion_mnist  # noqa: E402  (the reference trainer's reader)


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 1, 32, 32), bilinear resize (one channel kept)."""
    x = torch.from_numpy(images).float().div_(255.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    return (x - GREY_MEAN) / GREY_STD


def subset(count: int, total: int, seed: int = SUBSET_SEED) -> np.ndarray:
    """A fixed random subset of ``count`` indices out of ``total`` (all of them, in order, if count >= total)."""
    if count >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:count])


def build_model(args: argparse.Namespace, init: str, seed: int) -> tuple[torch.nn.Module, int]:
    """The seeded ViT, DCT-initialised as ``init`` says; returns it and how many attentions were set."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=4,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.num_heads,
    )
    count = apply_dct_init(model, init) if init != "none" else 0
    for module in model.modules():  # the plain matmul attention trains faster on the CPU here
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model, count


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """fp32 top-1 of ``model`` on one-channel images ``x``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch].expand(-1, 3, -1, -1))
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    return correct / len(x)


def train_one(
    args: argparse.Namespace, init: str, seed: int, data: tuple[torch.Tensor, ...]
) -> dict[str, Any]:
    """Train one model from scratch; its test accuracy, final training loss and timings."""
    xtr, ytr, xte, yte = data
    model, count = build_model(args, init, seed)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in ("pos_embed", "cls_token")]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in ("pos_embed", "cls_token"))
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = max(1, len(xtr) // args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_fraction * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 1e-5 + (args.lr - 1e-5) * 0.5 * (1.0 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(seed)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    fill = (0.0 - GREY_MEAN) / GREY_STD
    step, last_loss, seen = 0, 0.0, 0
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        epoch_loss, epoch_seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            x = augment(xtr[idx], 4, fill, gen).expand(-1, 3, -1, -1)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss = criterion(logits.float(), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            epoch_loss += loss.item() * len(idx)
            epoch_seen += len(idx)
        last_loss = epoch_loss / max(1, epoch_seen)
        seen += epoch_seen
    train_seconds = time.perf_counter() - start
    test_acc = accuracy(model, xte, yte)
    return {
        "init": init,
        "seed": seed,
        "dct_attentions": count,
        "test_top1": test_acc,
        "final_epoch_train_loss": last_loss,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "train_images_per_second": round(seen / train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def summarise(runs: list[dict[str, Any]], inits: list[str]) -> dict[str, dict[str, Any]]:
    """Per init: mean and sample std of the test accuracy, and the mean paired difference to ``none``."""
    base = {r["seed"]: r["test_top1"] for r in runs if r["init"] == "none"}
    out: dict[str, dict[str, Any]] = {}
    for init in inits:
        accs = [r["test_top1"] for r in runs if r["init"] == init]
        diffs = [r["test_top1"] - base[r["seed"]] for r in runs if r["init"] == init and r["seed"] in base]
        out[init] = {
            "runs": len(accs),
            "mean_top1": statistics.fmean(accs),
            "std_top1": statistics.stdev(accs) if len(accs) > 1 else None,
            "min_top1": min(accs),
            "max_top1": max(accs),
            "mean_diff_vs_none": statistics.fmean(diffs) if diffs and init != "none" else None,
            "std_diff_vs_none": statistics.stdev(diffs) if len(diffs) > 1 and init != "none" else None,
        }
    return out


def _pct(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a Markdown table (accuracies in %)."""
    lines = [
        "| init | runs | test top-1 mean | std | min | max | paired diff vs none (mean ± std) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for init, s in summary.items():
        diff = _pct(s["mean_diff_vs_none"], sign=True)
        if s["std_diff_vs_none"] is not None:
            diff += f" ± {_pct(s['std_diff_vs_none'])}"
        lines.append(
            f"| {init} | {s['runs']} | {_pct(s['mean_top1'])} | {_pct(s['std_top1'])} | "
            f"{_pct(s['min_top1'])} | {_pct(s['max_top1'])} | {diff} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inits", default="none,q,k,v,qkv", help="comma-separated: none, q, k, v, qkv")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--train-images", type=int, default=10_000, help="fixed training subset size (max 60000)")
    p.add_argument("--test-images", type=int, default=10_000, help="fixed test subset size (max 10000)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps spent warming up")
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast in training"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX files")
    p.add_argument("--output", type=Path, default=HERE / "results" / "dct_init_fashion.json")
    args = p.parse_args(argv)
    args.init_list = [v.strip() for v in args.inits.split(",") if v.strip()]
    bad = [v for v in args.init_list if v not in INITS]
    if bad or not args.init_list:
        p.error(f"--inits: {', '.join(bad) or 'empty'}: use values from {', '.join(INITS)}")
    try:
        args.seed_list = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seeds '{args.seeds}' is not a comma-separated list of integers")
    if not args.seed_list:
        p.error("--seeds is empty")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/dct_init_fashion.py " + shlex.join(argv_list)
    xtr_u8, ytr_u8, xte_u8, yte_u8 = load_fashion_mnist(args.data_dir)
    tr, te = subset(args.train_images, len(xtr_u8)), subset(args.test_images, len(xte_u8))
    data = (
        preprocess(xtr_u8[tr]),
        torch.from_numpy(ytr_u8[tr].astype(np.int64)),
        preprocess(xte_u8[te]),
        torch.from_numpy(yte_u8[te].astype(np.int64)),
    )
    print(
        f"{len(tr)} training / {len(te)} test images; ViT width {args.embed_dim}, depth {args.depth}, "
        f"{args.num_heads} heads; {args.epochs} epochs; inits {args.init_list}; seeds {args.seed_list}",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for seed in args.seed_list:
        for init in args.init_list:
            run = train_one(args, init, seed, data)
            runs.append(run)
            print(
                f"  seed {seed} init {init:>4}: test top-1 {100 * run['test_top1']:.2f}% "
                f"(loss {run['final_epoch_train_loss']:.3f}, {run['train_seconds']:.0f}s, "
                f"{run['train_images_per_second']:.0f} img/s)",
                flush=True,
            )
    summary = summarise(runs, args.init_list)
    print()
    print(table(summary))
    result = {
        "command": command,
        "created": now_iso(),
        "machine": machine_info("cpu"),
        "settings": {
            "model": {
                "architecture": "vit_tiny_patch16_224",
                "img_size": 32,
                "patch_size": 4,
                "embed_dim": args.embed_dim,
                "depth": args.depth,
                "num_heads": args.num_heads,
                "num_classes": 10,
            },
            "train_images": len(tr),
            "train_subset_seed": SUBSET_SEED if len(tr) < len(xtr_u8) else None,
            "test_images": len(te),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup_fraction": args.warmup_fraction,
            "label_smoothing": 0.1,
            "bf16_training": args.bf16,
            "inits": args.init_list,
            "seeds": args.seed_list,
        },
        "summary": summary,
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)
    print(f"\nWrote {args.output} ({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
