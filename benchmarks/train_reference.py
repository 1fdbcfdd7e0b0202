"""Train the embedded reference model ``vitshrink:fashion-vit`` on Fashion-MNIST.

The model is a small timm ``VisionTransformer`` (patch 4 on 32x32 RGB inputs, so an 8x8 token grid
plus a class token) trained from scratch on the CPU. The script is seeded and deterministic for a
given machine and thread count. It writes, atomically:

- ``<out>/fashion_vit/config.json``        timm Hub layout (as ``timm.models._hub.save_config_for_hf``)
- ``<out>/fashion_vit/model.safetensors``  the fp32 state dict
- ``<out>/fashion_vit/README.md``          what it is, how it was trained, measured accuracy
- ``<out>/fashion_mnist_sample/{train,test}/``  balanced 512-image slices, ``datasets`` imagefolder
  layout (28x28 grayscale PNGs + ``metadata.csv`` with ``file_name,label``), plus LICENSE and README.md

Training and evaluation use exactly the preprocessing timm derives from the saved config
(``timm.data.create_transform(**timm.data.resolve_model_data_config(model))``: RGB, bilinear resize
28 -> 32, a no-op centre crop, normalise), followed in training only by a random horizontal flip (and a
random crop with ``--pad`` pixels of padding when asked: in a 10-epoch budget a 4-pixel crop cost about
1.4 points of test accuracy, 87.6% against 89.0%, so it is off by default).

Usage::

    .venv/bin/python benchmarks/train_reference.py            # defaults: 10 epochs, seed 0
    .venv/bin/python benchmarks/train_reference.py --epochs 1 --out /tmp/fv   # quick smoke run
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models._hub import save_config_for_hf

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "vitshrink" / "embedded"
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_COPYRIGHT = Path("/usr/share/doc/dataset-fashion-mnist/copyright")

ARCHITECTURE = "vit_tiny_patch16_224"
MODEL_ARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "in_chans": 3,
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 4,
}
NUM_CLASSES = 10
LABEL_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Fashion-MNIST training-set grey statistics (pixel / 255), replicated over the 3 RGB channels.
GREY_MEAN = 0.2860
GREY_STD = 0.3530
DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (GREY_MEAN,) * 3,
    "std": (GREY_STD,) * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}
SAMPLE_SIZE = 512
MAX_WEIGHTS_BYTES = 5_000_000

MIT_LICENSE_BODY = """\
Permission is hereby granted, free of charge, to any person obtaining a
copy of this software and associated documentation files (the "Software"),
to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense,
and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included
in all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,
TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


# --------------------------------------------------------------------------------------------------
# Small helpers


def log(msg: str) -> None:
    """Print a progress line immediately (the script is often run with output piped to a file)."""
    print(msg, flush=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written ``tmp_dir`` into place at ``final_dir`` (renames; old copy removed last)."""
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file as used by MNIST / Fashion-MNIST into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims).copy()


def load_fashion_mnist(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(train_images, train_labels, test_images, test_labels)`` as uint8 arrays (N,28,28)/(N,)."""

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (data_dir / name).is_file():
                return data_dir / name
        raise FileNotFoundError(
            f"{data_dir / stem}(.gz) not found; install it with `apt-get install dataset-fashion-mnist` "
            "or pass --data-dir"
        )

    xtr = read_idx(find("train-images-idx3-ubyte"))
    ytr = read_idx(find("train-labels-idx1-ubyte"))
    xte = read_idx(find("t10k-images-idx3-ubyte"))
    yte = read_idx(find("t10k-labels-idx1-ubyte"))
    if xtr.shape != (60000, 28, 28) or xte.shape != (10000, 28, 28):
        raise ValueError(f"unexpected Fashion-MNIST shapes {xtr.shape} / {xte.shape}")
    return xtr, ytr, xte, yte


def preprocess(images: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Apply the timm eval transform to grey images converted to RGB; keep one channel (N,1,H,W).

    The three channels are identical (grey replicated, same mean/std per channel), so storing one
    saves memory; :func:`to_rgb` expands it back.
    """
    first = transform(Image.fromarray(images[0]).convert("RGB"))
    out = torch.empty((len(images), 1, *first.shape[1:]), dtype=torch.float32)
    for i, img in enumerate(images):
        t = transform(Image.fromarray(img).convert("RGB"))
        out[i, 0] = t[0]
    if not torch.equal(first[0], first[1]) or not torch.equal(first[0], first[2]):
        raise AssertionError("expected identical RGB channels after preprocessing")
    return out


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Expand a (N,1,H,W) batch to (N,3,H,W)."""
    return x.expand(-1, 3, -1, -1).contiguous()


def augment(x: torch.Tensor, pad: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Random crop with ``pad`` pixels of ``fill`` padding, then random horizontal flip (batched)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, batch: int = 500) -> float:
    """Top-1 accuracy of ``model`` on preprocessed one-channel images ``x`` with labels ``y``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(to_rgb(x[i : i + batch]))
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    return correct / len(x)


def _as_tuples(cfg: dict[str, Any]) -> dict[str, Any]:
    """Return ``cfg`` with list values turned into tuples, for comparing a config with its JSON form."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def set_fused_attn(model: torch.nn.Module, enabled: bool) -> None:
    """Toggle timm's fused SDPA attention. On CPU, the plain matmul path trains ~2x faster here."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def balanced_indices(labels: np.ndarray, total: int) -> list[int]:
    """Deterministic class-balanced pick: the first indices of each class in file order.

    ``total`` is split as evenly as possible (512 over 10 classes: 52 for classes 0-1, 51 for the rest).
    Returned sorted by original index.
    """
    per, extra = divmod(total, NUM_CLASSES)
    picked: list[int] = []
    for c in range(NUM_CLASSES):
        k = per + (1 if c < extra else 0)
        picked.extend(np.flatnonzero(labels == c)[:k].tolist())
    return sorted(picked)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode a 28x28 uint8 grey image as PNG."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def mit_license_text() -> str:
    """Fashion-MNIST's MIT (Expat) licence text with Zalando SE's copyright line."""
    header = "The MIT License (MIT)\n\nCopyright (c) 2017 Zalando SE\n\n"
    return header + MIT_LICENSE_BODY


# --------------------------------------------------------------------------------------------------
# Outputs


def write_sample(
    out_dir: Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    size: int,
) -> dict[str, list[int]]:
    """Write the imagefolder slices, LICENSE and README into ``out_dir`` (built aside, then swapped in)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    picked: dict[str, list[int]] = {}
    try:
        for split, (images, labels), source in (
            ("train", train, "train-images-idx3-ubyte"),
            ("test", test, "t10k-images-idx3-ubyte"),
        ):
            idx = balanced_indices(labels, size)
            picked[split] = idx
            split_dir = tmp / split
            split_dir.mkdir()
            rows = []
            for i in idx:
                name = f"{split}-{i:05d}.png"
                (split_dir / name).write_bytes(png_bytes(images[i]))
                rows.append((name, int(labels[i])))
            with open(split_dir / "metadata.csv", "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["file_name", "label"])
                writer.writerows(rows)
            log(f"sample: {split}: {len(idx)} images from {source} (indices {idx[0]}..{idx[-1]})")
        (tmp / "LICENSE").write_text(mit_license_text())
        counts = ", ".join(f"{c} {name}" for c, name in enumerate(LABEL_NAMES))
        readme = f"""# Fashion-MNIST sample slice

A small, class-balanced slice of [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist)
(Zalando SE, MIT licence: see `LICENSE`), shipped inside vitshrink so that the demo and the tests have
real images without a download.

- `train/`: {size} images from the Fashion-MNIST training set (`train-images-idx3-ubyte`).
  The embedded model `vitshrink:fashion-vit` was trained on the full training set, these included.
- `test/`: {size} images from the Fashion-MNIST test set (`t10k-images-idx3-ubyte`), never trained on.

Each split is a Hugging Face `datasets` imagefolder: 28x28 grayscale PNGs plus `metadata.csv` with the
header `file_name,label`, where `label` is the class index ({counts}). Files are named
`<split>-<index>.png`, `<index>` being the image's position in the original IDX file.

Selection is deterministic: for each class, the first images of that class in file order,
{size // NUM_CLASSES} or {size // NUM_CLASSES + 1} per class ({size} over {NUM_CLASSES} classes).

Source: the Debian package `dataset-fashion-mnist` (files under `/usr/share/datasets/fashion-mnist/`).
Regenerate with `python benchmarks/train_reference.py` (writes this folder and the model).
"""
        (tmp / "README.md").write_text(readme)
        for p in tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return picked


def build_model(seed: int) -> torch.nn.Module:
    """Create the untrained ViT (seeded) with a clean pretrained_cfg describing our preprocessing."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=NUM_CLASSES, **MODEL_ARGS)
    # Replace the ImageNet cfg inherited from vit_tiny_patch16_224 (URLs, tags, 224px, bicubic).
    model.pretrained_cfg = {
        "architecture": ARCHITECTURE,
        "tag": "fashion_mnist",
        "custom_load": False,
        **{k: v for k, v in DATA_CONFIG.items()},
        "fixed_input_size": True,
        "num_classes": NUM_CLASSES,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "label_names": list(LABEL_NAMES),
        "license": "apache-2.0",
    }
    return model


def save_model(model: torch.nn.Module, out_dir: Path) -> dict[str, Any]:
    """Write config.json and model.safetensors atomically; return the config dict written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        tmp_cfg = Path(tmp) / "config.json"
        save_config_for_hf(
            model,
            str(tmp_cfg),
            model_config={"label_names": list(LABEL_NAMES)},
            model_args=dict(MODEL_ARGS),
            data_config=dict(DATA_CONFIG),
        )
        config = json.loads(tmp_cfg.read_text())
    # timm keeps label_names at the root (moved into pretrained_cfg on load); also keep them in
    # pretrained_cfg so readers of the raw JSON find them next to the rest of the data config.
    config["pretrained_cfg"]["label_names"] = list(LABEL_NAMES)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights = safetensors.torch.save(state, metadata={"format": "pt"})
    if len(weights) > MAX_WEIGHTS_BYTES:
        raise RuntimeError(f"model.safetensors would be {len(weights)} bytes (> {MAX_WEIGHTS_BYTES})")
    atomic_write_bytes(out_dir / "model.safetensors", weights)
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return config


def slice_accuracy(model: torch.nn.Module, split_dir: Path) -> tuple[float, int]:
    """Accuracy on an imagefolder split read from disk, preprocessed with the model's own timm cfg."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with open(split_dir / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    xs = torch.stack([transform(Image.open(split_dir / r["file_name"]).convert("RGB")) for r in rows])
    ys = torch.tensor([int(r["label"]) for r in rows])
    model.eval()
    with torch.no_grad():
        preds = model(xs).argmax(-1)
    return float((preds == ys).float().mean()), len(rows)


def write_model_readme(out_dir: Path, info: dict[str, Any]) -> None:
    """Write the model card README.md for the embedded model."""
    args = ", ".join(f"{k}={v}" for k, v in MODEL_ARGS.items())
    text = f"""# vitshrink:fashion-vit

A small Vision Transformer trained from scratch by vitshrink on
[Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist). It is the default model of
`make demo` and of many tests: tiny, fast on a CPU, and a real trained ViT with early and late layers
for the compression methods to work on.

- Architecture: timm `VisionTransformer`, built as
  `timm.create_model("{ARCHITECTURE}", num_classes={NUM_CLASSES}, {args})`:
  patch 4 on 32x32 RGB inputs, an 8x8 token grid plus a class token (65 tokens), head dim
  {MODEL_ARGS["embed_dim"] // MODEL_ARGS["num_heads"]}, MLP ratio 4, class-token pooling.
- Parameters: {info["params"]:,}; `model.safetensors` {info["weights_bytes"]:,} bytes (fp32).
- Inputs: Fashion-MNIST 28x28 grey images converted to RGB, bilinear resize to 32x32, normalised with
  mean {GREY_MEAN} / std {GREY_STD} on every channel (the Fashion-MNIST grey statistics);
  `crop_pct` 1.0. `timm.data.create_transform(**timm.data.resolve_model_data_config(model))` gives
  exactly this.
- Classes (index: name): {", ".join(f"{i}: {n}" for i, n in enumerate(LABEL_NAMES))}.

## Measured accuracy

| test set | images | top-1 |
| --- | ---: | ---: |
| Fashion-MNIST test set (full) | 10,000 | {info["test_acc"] * 100:.2f}% |
| `fashion_mnist_sample/test` slice | {info["slice_n"]} | {info["slice_acc"] * 100:.2f}% |

fp32, measured by `benchmarks/train_reference.py` right after training; the slice accuracy comes from
reloading this folder with `timm.create_model("local-dir:...", pretrained=True)` and reading the PNGs.

## Training

```
{info["command"]}
```

{info["epochs"]} epochs over the 60,000 training images, batch {info["batch_size"]}, AdamW
(peak lr {info["lr"]}, weight decay {info["weight_decay"]}), {info["warmup_epochs"]:g} warm-up epoch(s)
then cosine decay, label smoothing {info["label_smoothing"]}, gradient clipping at 1.0, bf16 autocast,
{info["augmentation"]}, seed {info["seed"]}.

Training wall time: {info["train_minutes"]:.1f} min on {info["machine"]} with
`torch.set_num_threads({info["threads"]})` (torch {torch.__version__}, timm {timm.__version__}).

## Loading

```python
import timm
model = timm.create_model("local-dir:path/to/vitshrink/embedded/fashion_vit", pretrained=True)
```

## Licence

The weights are released with vitshrink under the Apache-2.0 licence. They were trained on
Fashion-MNIST, Copyright (c) 2017 Zalando SE, MIT licence (see `../fashion_mnist_sample/LICENSE`).
"""
    atomic_write_text(out_dir / "README.md", text)


# --------------------------------------------------------------------------------------------------
# Main


def train(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    max_epochs: int | None = None,
) -> float:
    """Train ``model`` in place on preprocessed ``(xtr, ytr, xte, yte)``; return the wall time in minutes.

    AdamW (no weight decay on biases, norms, position embedding and class token), linear warm-up then
    cosine decay, label smoothing, gradient clipping, bf16 autocast. ``max_epochs`` stops early while
    keeping the ``args.epochs`` schedule (for quick hyper-parameter checks).
    """
    xtr, ytr, xte, yte = data
    fill = (0.0 - GREY_MEAN) / GREY_STD  # a black (background) pixel after normalisation
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    steps_per_epoch = len(xtr) // args.batch_size  # drop the last partial batch
    total_steps = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 1e-5 + (args.lr - 1e-5) * 0.5 * (1.0 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(args.seed)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    set_fused_attn(model, False)
    step = 0
    t_train = time.time()
    for epoch in range(args.epochs if max_epochs is None else min(max_epochs, args.epochs)):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        t_ep = time.time()
        run_loss, run_correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            x = to_rgb(augment(xtr[idx], args.pad, fill, gen))
            y = ytr[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x)
            loss = criterion(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            run_loss += loss.item() * len(y)
            run_correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            if (b + 1) % 100 == 0:
                rate = seen / (time.time() - t_ep)
                log(
                    f"  epoch {epoch + 1} step {b + 1}/{steps_per_epoch} loss {run_loss / seen:.4f} "
                    f"train-acc {run_correct / seen:.4f} lr {lr_at(step):.2e} ({rate:.0f} img/s)"
                )
        test_acc = accuracy(model, xte, yte, bf16=True)
        log(
            f"epoch {epoch + 1}/{args.epochs}: loss {run_loss / seen:.4f} train-acc {run_correct / seen:.4f} "
            f"test-acc(bf16) {test_acc:.4f} [{time.time() - t_ep:.0f}s, total {(time.time() - t_train) / 60:.1f} min]"
        )
    set_fused_attn(model, True)
    return (time.time() - t_train) / 60


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Fashion-MNIST IDX files")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--pad", type=int, default=0, help="random-crop padding in pixels (default 0: no crop, flip only)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--sample-size", type=int, default=SAMPLE_SIZE, help="images per sample split")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate, save and verify the reference model; return the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out: Path = args.out.resolve()
    t_start = time.time()

    log(f"loading Fashion-MNIST from {args.data_dir}")
    xtr_u8, ytr_u8, xte_u8, yte_u8 = load_fashion_mnist(args.data_dir)
    write_sample(out / "fashion_mnist_sample", (xtr_u8, ytr_u8), (xte_u8, yte_u8), args.sample_size)

    model = build_model(args.seed)
    data_cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data_cfg)
    log(f"data config: {data_cfg}")
    t0 = time.time()
    xtr = preprocess(xtr_u8, transform)
    xte = preprocess(xte_u8, transform)
    ytr = torch.from_numpy(ytr_u8.astype(np.int64))
    yte = torch.from_numpy(yte_u8.astype(np.int64))
    log(f"preprocessed {len(xtr)} + {len(xte)} images in {time.time() - t0:.1f}s")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {ARCHITECTURE} {MODEL_ARGS} -> {n_params:,} parameters")

    train_minutes = train(model, (xtr, ytr, xte, yte), args)

    model = model.float().eval()
    test_acc = accuracy(model, xte, yte, bf16=False)
    log(f"final test accuracy (fp32, full 10k test set): {test_acc:.4f}")

    model_dir = out / "fashion_vit"
    config = save_model(model, model_dir)
    weights_bytes = (model_dir / "model.safetensors").stat().st_size
    log(f"wrote {model_dir}: config.json, model.safetensors ({weights_bytes:,} bytes)")

    # Verify the saved folder through timm's own loader and data config.
    reloaded = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
    ref_state = model.state_dict()
    for k, v in reloaded.state_dict().items():
        if not torch.equal(v, ref_state[k]):
            raise AssertionError(f"reloaded tensor {k} differs")
    re_cfg = timm.data.resolve_model_data_config(reloaded)
    if _as_tuples(re_cfg) != _as_tuples(data_cfg):  # JSON turns tuples into lists
        raise AssertionError(f"reloaded data config {re_cfg} != training data config {data_cfg}")
    re_transform = timm.data.create_transform(**re_cfg)
    for i in range(64):
        t = re_transform(Image.fromarray(xte_u8[i]).convert("RGB"))
        if not torch.equal(t, to_rgb(xte[i : i + 1])[0]):
            raise AssertionError(
                f"reloaded preprocessing differs from training preprocessing (test image {i})"
            )
    slice_acc, slice_n = slice_accuracy(reloaded, out / "fashion_mnist_sample" / "test")
    log(
        f"reloaded via local-dir: data config matches; accuracy on the {slice_n}-image test slice: {slice_acc:.4f}"
    )

    cmd = "python benchmarks/train_reference.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("epochs", args.epochs), ("seed", args.seed))
    )
    write_model_readme(
        model_dir,
        {
            "params": n_params,
            "weights_bytes": weights_bytes,
            "test_acc": test_acc,
            "slice_acc": slice_acc,
            "slice_n": slice_n,
            "command": cmd,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup_epochs": args.warmup_epochs,
            "label_smoothing": args.label_smoothing,
            "augmentation": (
                f"random crop (padding {args.pad}) and horizontal flip"
                if args.pad
                else "random horizontal flip"
            ),
            "seed": args.seed,
            "train_minutes": train_minutes,
            "threads": args.threads,
            "machine": f"a shared {os.cpu_count()}-core {platform.machine()} CPU",
        },
    )
    log(
        f"done: test-acc {test_acc:.4f}, slice-acc {slice_acc:.4f}, {n_params:,} params, "
        f"{weights_bytes:,} bytes, training {train_minutes:.1f} min, total {(time.time() - t_start) / 60:.1f} min"
    )
    log(json.dumps({"architecture": config["architecture"], "model_args": config["model_args"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
