"""Distillation fine-tune: a short, plain training loop (in the style of accelerate's examples).

The rewritten model (the *student*) learns to match the original model (the *teacher*) on
unlabelled training images:

* KL(teacher || student) on temperature-softened logits, scaled by ``T**2``;
* optionally, for each block index in ``feature_layers``, the MSE between the student's and the
  teacher's output of ``blocks[i]``, divided by the teacher feature's mean square (scale-free),
  averaged over the layers and weighted by ``feature_weight``;
* optionally, for each block index in ``prefix_layers``, the same normalised MSE on the prefix
  (class/distillation) tokens only, weighted by ``class_token_weight``. These tokens exist in both
  models even after a method has reduced or merged the patch tokens, so every block of a GLAD or
  ToMe student gets a teacher signal, not just the logits.

Training runs through :class:`accelerate.Accelerator`, so the same call works on one CPU, one GPU,
or under ``accelerate launch --multi_gpu --num_processes N`` (``ACCELERATE_USE_CPU=true`` for
several CPU processes with gloo; see :func:`distill`). Only the main process prints and writes.

The student is trained **in place**: after :func:`distill` returns, the module that was passed in
holds the trained weights (it may now live on ``accelerator.device``) and is also returned as
:attr:`FinetuneResult.student`. The teacher is never modified (it is only moved to the device).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from vitshrink.errors import VitshrinkError
from vitshrink.progress import progress_bar

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["FinetuneConfig", "FinetuneResult", "distill", "distill_loss", "resolve_mixed_precision"]

CHECKPOINT_NAME = "checkpoint"
STATE_FILE = "vitshrink_finetune.json"
_MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# Config fields that must agree between a saved state and a resumed run (they define the schedule).
_RESUME_KEYS = ("steps", "lr", "batch_size", "grad_accum", "weight_decay", "warmup_steps")


@dataclass
class FinetuneConfig:
    """Knobs of the distillation fine-tune."""

    steps: int = 300
    """Optimizer steps; 0 skips the fine-tune entirely."""
    lr: float = 1e-4
    batch_size: int = 32
    """Per process."""
    grad_accum: int = 1
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    """Linear warm-up steps before the cosine decay; None means about 5% of ``steps``."""
    temperature: float = 2.0
    """Temperature of the logit KL (the loss is scaled by T**2)."""
    feature_weight: float = 1.0
    """Weight of the per-layer feature MSE (normalised by the teacher feature's mean square)."""
    class_token_weight: float = 1.0
    """Weight of the per-layer MSE on the prefix (class) tokens at ``prefix_layers`` (normalised likewise)."""
    mixed_precision: str = "auto"
    """'auto' (bf16 on CUDA devices that support it, else 'no'), 'no', 'bf16' or 'fp16'."""
    seed: int = 0
    save_every: int = 50
    """Optimizer steps between resumable state saves (only when ``state_dir`` is given)."""
    num_workers: int = 0

    def resolved_warmup(self) -> int:
        """Warm-up steps actually used."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, round(0.05 * self.steps)) if self.steps > 0 else 0

    def validate(self) -> None:
        """Raise :class:`VitshrinkError` on an impossible value."""
        checks: list[tuple[bool, str]] = [
            (self.steps >= 0, f"steps={self.steps} is negative: give 0 (skip) or a positive number."),
            (self.lr > 0, f"lr={self.lr} must be positive, e.g. 1e-4."),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1."),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be at least 1."),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0."),
            (
                self.warmup_steps is None or self.warmup_steps >= 0,
                f"warmup_steps={self.warmup_steps} must be >= 0 (or unset for ~5% of steps).",
            ),
            (self.temperature > 0, f"temperature={self.temperature} must be positive, e.g. 2.0."),
            (self.feature_weight >= 0, f"feature_weight={self.feature_weight} must be >= 0."),
            (self.class_token_weight >= 0, f"class_token_weight={self.class_token_weight} must be >= 0."),
            (
                self.mixed_precision in _MIXED_PRECISION,
                f"mixed_precision='{self.mixed_precision}' is not one of {', '.join(_MIXED_PRECISION)}.",
            ),
            (self.save_every >= 1, f"save_every={self.save_every} must be at least 1."),
            (self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0."),
        ]
        for ok, message in checks:
            if not ok:
                raise VitshrinkError(f"Fine-tune: {message}")


@dataclass
class FinetuneResult:
    """What :func:`distill` did."""

    steps_done: int
    """Optimizer steps completed in total (including those restored from a resumed state)."""
    losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step run by this call (mean over micro-batches and processes)."""
    final_loss: float | None = None
    """Mean of the last (up to) 10 step losses; None when no step ran."""
    seconds: float = 0.0
    resumed_from: int | None = None
    """The step the state was resumed from, or None for a fresh run."""
    lrs: list[float] = field(default_factory=list)
    """Learning rate of every optimizer step run by this call."""
    student: nn.Module | None = field(default=None, repr=False)
    """The trained student (the same module object that was passed in, unwrapped)."""


def resolve_mixed_precision(value: str, *, cpu: bool | None = None) -> str:
    """'auto' -> 'bf16' on a CUDA device with bf16 support, else 'no'; other values unchanged."""
    if value != "auto":
        return value
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "false").strip().lower() in ("1", "true", "yes", "y")
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_features: Sequence[torch.Tensor] = (),
    teacher_features: Sequence[torch.Tensor] = (),
    student_prefix: Sequence[torch.Tensor] = (),
    teacher_prefix: Sequence[torch.Tensor] = (),
    *,
    temperature: float = 2.0,
    feature_weight: float = 1.0,
    class_token_weight: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) at temperature T (times T**2) plus the weighted, normalised feature MSEs.

    ``student_features``/``teacher_features`` are whole block outputs; ``student_prefix``/
    ``teacher_prefix`` are the prefix tokens of block outputs. Each pair's MSE is divided by the
    teacher tensor's mean square; each group is averaged over its layers and weighted.
    """
    t = temperature
    loss = (
        F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=-1),
            F.log_softmax(teacher_logits.float() / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )
    if student_features and feature_weight > 0:
        loss = loss + feature_weight * _normalised_mse(student_features, teacher_features)
    if student_prefix and class_token_weight > 0:
        loss = loss + class_token_weight * _normalised_mse(student_prefix, teacher_prefix)
    return loss


def _normalised_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of MSE(s, t) / mean(t**2): scale-free, so every layer counts alike."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        t = t.detach().float()
        terms.append(F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-6))
    return torch.stack(terms).mean()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups following timm: no decay on biases, norms, 1-D params, position embeddings, tokens."""
    from timm.optim import param_groups_weight_decay

    skip: set[str] = set()
    no_wd = getattr(model, "no_weight_decay", None)
    if callable(no_wd):
        skip |= set(no_wd())
    skip |= {"*pos_embed*", "*position*", "*token*", "*rel_pos*"}
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    if not groups:
        raise VitshrinkError(
            "The student has no trainable parameters: unfreeze some (requires_grad=True) or use steps=0."
        )
    return groups


def _blocks(model: nn.Module, role: str, layers: Sequence[int]) -> Sequence[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise VitshrinkError(
            f"feature_layers needs a timm ViT with a 'blocks' sequence, but the {role} "
            f"({type(model).__name__}) has none: drop feature_layers or use a VisionTransformer."
        )
    for i in layers:
        if not 0 <= i < len(blocks):
            raise VitshrinkError(
                f"feature_layers: block {i} is out of range for the {role}, "
                f"which has blocks 0-{len(blocks) - 1}."
            )
    return blocks


class _FeatureTap:
    """Forward hooks that keep the output of selected blocks of a model."""

    def __init__(self, model: nn.Module, layers: Sequence[int], role: str) -> None:
        blocks = _blocks(model, role, layers)
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[index] = output

        return hook

    def take(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        out = {i: self.outputs[i] for i in layers}
        self.outputs.clear()
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.outputs.clear()


def _check_features(
    layers: Sequence[int], student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
) -> None:
    for i, s, t in zip(layers, student, teacher, strict=True):
        if s.shape != t.shape:
            what = "token counts" if s.ndim == t.ndim == 3 and s.shape[1] != t.shape[1] else "shapes"
            raise VitshrinkError(
                f"feature_layers: block {i} output {what} differ (student {tuple(s.shape)}, teacher "
                f"{tuple(t.shape)}); only match blocks whose outputs line up (before any token reduction)."
            )


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    elif isinstance(batch, dict):
        for key in ("image", "pixel_values", "images", "img"):
            if key in batch:
                batch = batch[key]
                break
    if not isinstance(batch, torch.Tensor):
        raise VitshrinkError(
            f"The training set yields {type(batch).__name__}, not (image_tensor, label): "
            "build it with timm's training transform so items are tensors."
        )
    return batch


def _endless(loader: Any) -> Iterator[Any]:
    """Re-iterate a DataLoader forever (a new shuffle every epoch)."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        seen = 0
        for batch in loader:
            seen += 1
            yield batch
        if seen == 0:
            raise VitshrinkError("The training set produced no batch: give it at least one image.")
        epoch += 1


def _checkpoint_dir(state_dir: Path) -> Path | None:
    """The saved state folder, falling back to the previous one if a swap was interrupted."""
    for name in (CHECKPOINT_NAME, CHECKPOINT_NAME + ".old"):
        candidate = state_dir / name
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def _read_state(state_dir: Path, config: FinetuneConfig) -> tuple[Path, int]:
    found = _checkpoint_dir(state_dir)
    if found is None:
        raise VitshrinkError(
            f"resume was asked but {state_dir} holds no saved fine-tune state: "
            "run without resume, or point state_dir at the folder of the interrupted run."
        )
    meta = json.loads((found / STATE_FILE).read_text())
    saved = meta.get("config", {})
    current = asdict(config)
    current["warmup_steps"] = config.resolved_warmup()
    diffs = [f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in _RESUME_KEYS if saved.get(k) != current[k]]
    if diffs:
        raise VitshrinkError(
            f"The saved fine-tune state in {state_dir} was made with other settings ({'; '.join(diffs)}): "
            "resume with the same settings, or start afresh without resume."
        )
    return found, int(meta["step"])


def _save_state(accelerator: Accelerator, state_dir: Path, step: int, config: FinetuneConfig) -> None:
    """accelerator.save_state into a temp folder, then swap it in for the old checkpoint."""
    final = state_dir / CHECKPOINT_NAME
    tmp = state_dir / (CHECKPOINT_NAME + ".tmp")
    old = state_dir / (CHECKPOINT_NAME + ".old")
    if accelerator.is_main_process:
        state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        saved = asdict(config)
        saved["warmup_steps"] = config.resolved_warmup()
        meta = {"step": step, "config": saved, "num_processes": accelerator.num_processes}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _make_accelerator(config: FinetuneConfig) -> Accelerator:
    from accelerate import Accelerator

    precision = resolve_mixed_precision(config.mixed_precision)
    try:
        return Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=precision)
    except ValueError as exc:
        raise VitshrinkError(
            f"Could not set up accelerate with mixed_precision='{precision}' ({exc}): "
            "pass accelerator=... or keep one precision per process."
        ) from exc


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_set: Dataset,
    config: FinetuneConfig,
    *,
    feature_layers: Sequence[int] = (),
    prefix_layers: Sequence[int] = (),
    num_prefix_tokens: int = 1,
    state_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` to match ``teacher`` on ``train_set`` for ``config.steps`` optimizer steps.

    ``train_set`` yields ``(image_tensor, label)``; labels are ignored. ``feature_layers`` are blocks
    whose whole outputs are matched, ``prefix_layers`` blocks whose first ``num_prefix_tokens`` output
    tokens (class/distillation) are matched (see :func:`distill_loss`). The student is trained in
    place (and returned as ``result.student``); the teacher stays frozen. With ``state_dir`` a
    resumable state is saved every ``config.save_every`` steps to ``state_dir/checkpoint``;
    ``resume=True`` continues from it (without ``resume`` an old state there is overwritten).
    Removing ``state_dir`` after success is left to the caller. Pass ``accelerator`` to reuse one
    (its mixed precision is then used as is); otherwise one is created from the config.

    Several processes: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2
    --main_process_port 0 script.py`` on CPU (gloo; ``--cpu --num_processes 2`` starts only one
    process), or ``accelerate launch --multi_gpu --num_processes N`` on GPUs.
    """
    config.validate()
    if config.steps == 0:
        return FinetuneResult(steps_done=0, student=student)
    if student is teacher:
        raise VitshrinkError("The student and the teacher are the same module: pass a copy of the original.")
    layers = sorted({int(i) for i in feature_layers})
    prefix = sorted({int(i) for i in prefix_layers} - set(layers)) if num_prefix_tokens > 0 else []
    tapped = sorted(set(layers) | set(prefix))
    if resume and state_dir is None:
        raise VitshrinkError("resume=True needs state_dir: give the folder the interrupted run saved to.")
    state_dir = Path(state_dir) if state_dir is not None else None
    resume_from = _read_state(state_dir, config) if resume and state_dir is not None else None
    try:
        size = len(train_set)  # type: ignore[arg-type]
    except TypeError:
        size = None
    if size == 0:
        raise VitshrinkError("The training set is empty: give the fine-tune at least one image.")

    from accelerate.utils import set_seed

    own_accelerator = accelerator is None
    if accelerator is None:
        accelerator = _make_accelerator(config)
    else:
        accelerator.gradient_accumulation_steps = config.grad_accum
        accelerator.step = 0
        if state_dir is not None and accelerator.project_configuration.automatic_checkpoint_naming:
            raise VitshrinkError(
                "The accelerator passed in names its checkpoints itself (automatic_checkpoint_naming), "
                "which would ignore state_dir: pass one without it, or no accelerator."
            )
    set_seed(config.seed)
    start = time.perf_counter()

    student_was_training, teacher_was_training = student.training, teacher.training
    teacher.to(accelerator.device)
    teacher.eval()
    student.train()
    taps: list[_FeatureTap] = []
    model: nn.Module = student
    try:
        if tapped:
            taps = [_FeatureTap(student, tapped, "student"), _FeatureTap(teacher, tapped, "teacher")]
        start_step = resume_from[1] if resume_from else 0
        # A resumed run sees a different (still seeded) data order than the interrupted one.
        generator = torch.Generator().manual_seed(config.seed + start_step)
        iterable = isinstance(train_set, IterableDataset)
        loader = DataLoader(
            train_set,
            batch_size=config.batch_size,
            shuffle=not iterable,
            generator=None if iterable else generator,
            drop_last=size is not None and size >= config.batch_size * accelerator.num_processes,
            num_workers=config.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=config.num_workers > 0,
        )
        optimizer = torch.optim.AdamW(_param_groups(student, config.weight_decay), lr=config.lr)
        model, optimizer, loader = accelerator.prepare(student, optimizer, loader)
        if resume_from is not None:
            accelerator.load_state(str(resume_from[0]))

        # The schedule counts optimizer steps, so it is stepped here rather than through
        # accelerate's scheduler wrapper (which steps num_processes times per call). It restarts
        # from start_step on resume, whatever the loaded optimizer state says.
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = config.lr
        total, warmup = config.steps, config.resolved_warmup()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            getattr(optimizer, "optimizer", optimizer), lambda i: _lr_factor(start_step + i, total, warmup)
        )

        step = start_step
        losses: list[float] = []
        lrs: list[float] = []
        batches = _endless(loader)
        pending: list[torch.Tensor] = []
        with progress_bar("distil", total, enabled=progress and accelerator.is_main_process) as advance:
            if step:
                advance(step, info="resumed")
            while step < total:
                images = _images(next(batches))
                with accelerator.accumulate(model):
                    with torch.no_grad(), accelerator.autocast():
                        teacher_logits = teacher(images)
                    student_logits = model(images)
                    s_out = taps[0].take(tapped) if taps else {}
                    t_out = taps[1].take(tapped) if taps else {}
                    s_feats, t_feats = [s_out[i] for i in layers], [t_out[i] for i in layers]
                    _check_features(layers, s_feats, t_feats)
                    p = num_prefix_tokens
                    loss = distill_loss(
                        student_logits,
                        teacher_logits,
                        s_feats,
                        t_feats,
                        [s_out[i][:, :p] for i in prefix],
                        [t_out[i][:, :p] for i in prefix],
                        temperature=config.temperature,
                        feature_weight=config.feature_weight,
                        class_token_weight=config.class_token_weight,
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                pending.append(loss.detach())
                if not accelerator.sync_gradients:
                    continue
                # One optimizer step done (accelerate syncs every grad_accum micro-batches and at
                # the end of each pass over the data).
                lrs.append(float(optimizer.param_groups[0]["lr"]))
                scheduler.step()
                step += 1
                mean_loss = accelerator.reduce(torch.stack(pending).mean(), reduction="mean")
                pending.clear()
                losses.append(float(mean_loss))
                advance(1, info=f"loss {losses[-1]:.4f}  lr {lrs[-1]:.2e}")
                if state_dir is not None and (step % config.save_every == 0 or step == total):
                    _save_state(accelerator, state_dir, step, config)
        accelerator.wait_for_everyone()
    finally:
        for tap in taps:
            tap.remove()
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        model.train(student_was_training)
        teacher.train(teacher_was_training)
        if own_accelerator:
            accelerator.free_memory()

    tail = losses[-10:]
    return FinetuneResult(
        steps_done=step,
        losses=losses,
        final_loss=sum(tail) / len(tail) if tail else None,
        seconds=time.perf_counter() - start,
        resumed_from=start_step if resume_from is not None else None,
        lrs=lrs,
        student=model,
    )
