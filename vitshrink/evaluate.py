"""Accuracy of a model on a data source, and its agreement with a reference model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitshrink.data import UNLABELLED, ImageSource, make_dataset, make_loader
from vitshrink.measure import RunSettings
from vitshrink.progress import progress_bar


@dataclass
class Accuracy:
    images: int = 0
    """Images evaluated (readable ones)."""
    skipped: int = 0
    """Unreadable images that were skipped (each also gets a warning)."""
    top1: float | None = None
    top5: float | None = None
    reference_top1: float | None = None
    reference_top5: float | None = None
    agreement_top1: float | None = None
    """Fraction of images where the model's top-1 class equals the reference's."""
    kl_to_reference: float | None = None
    """Mean KL(reference || model) of the softmax predictions, in nats."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Tally:
    def __init__(self) -> None:
        self.n = 0
        self.labelled = 0
        self.top1 = 0
        self.top5 = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.n += len(logits)
        mask = labels != UNLABELLED
        if not mask.any():
            return
        logits, labels = logits[mask], labels[mask]
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        self.labelled += len(labels)
        self.top1 += int((top[:, 0] == labels).sum())
        self.top5 += int((top == labels[:, None]).any(dim=-1).sum())

    def rates(self) -> tuple[float | None, float | None]:
        if self.labelled == 0:
            return None, None
        return self.top1 / self.labelled, self.top5 / self.labelled


def evaluate(
    model: nn.Module,
    source: ImageSource,
    *,
    reference: nn.Module | None = None,
    settings: RunSettings | None = None,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    accelerator: Any | None = None,
) -> Accuracy:
    """Top-1/top-5 where labels exist; with ``reference``, top-1 agreement and mean KL to it.

    With an ``accelerate.Accelerator`` the images are sharded over processes and the counts
    gathered, so the result is the same as a single-process run.
    """
    settings = settings or RunSettings()
    num_classes = getattr(model, "num_classes", None)
    if num_classes:
        source.check_labels(num_classes)
    if accelerator is not None and accelerator.num_processes > 1:  # exact sharding: image i -> process i % n
        source = source.subset(range(accelerator.process_index, len(source), accelerator.num_processes))
    dataset = make_dataset(source, model)
    loader = make_loader(dataset, batch_size=batch_size, workers=workers)
    ref_loader = None
    if reference is not None:
        ref_dataset = make_dataset(source, reference)
        if repr(ref_dataset.transform) != repr(dataset.transform):  # the reference preprocesses differently
            ref_loader = make_loader(ref_dataset, batch_size=batch_size, workers=workers)
    device = settings.device
    model = settings.prepare(model)
    ref = settings.prepare(reference) if reference is not None else None
    if accelerator is not None:
        device = str(accelerator.device)
        model, ref = model.to(device), (ref.to(device) if ref is not None else None)

    tally, ref_tally = _Tally(), _Tally()
    agree, kl_sum, skipped = 0, 0.0, 0
    batches = zip(loader, ref_loader, strict=True) if ref_loader is not None else ((b, None) for b in loader)
    with progress_bar("Evaluating", total=len(loader), enabled=progress) as advance, torch.inference_mode():
        for (images, labels, ok), ref_batch in batches:
            skipped += int((~ok).sum())
            images, labels, ok = images.to(device), labels.to(device), ok.to(device)
            with settings.autocast():
                logits = model(images[ok]).float()
            tally.add(logits, labels[ok])
            if ref is not None:
                ref_images = images[ok] if ref_batch is None else ref_batch[0].to(device)[ok]
                with settings.autocast():
                    ref_logits = ref(ref_images).float()
                ref_tally.add(ref_logits, labels[ok])
                agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
                kl_sum += float(
                    F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True, reduction="sum")
                )
            advance()

    counts = torch.tensor(
        [tally.n, skipped, tally.labelled, tally.top1, tally.top5, ref_tally.labelled, ref_tally.top1, ref_tally.top5, agree, kl_sum],
        dtype=torch.float64,
        device=device,
    )
    if accelerator is not None:
        counts = accelerator.reduce(counts, reduction="sum")
    n, skipped_t, labelled, top1, top5, rl, r1, r5, agree_t, kl_t = counts.tolist()
    result = Accuracy(images=int(n), skipped=int(skipped_t))
    if labelled:
        result.top1, result.top5 = top1 / labelled, top5 / labelled
    if ref is not None and n:
        result.agreement_top1 = agree_t / n
        result.kl_to_reference = kl_t / n
        if rl:
            result.reference_top1, result.reference_top5 = r1 / rl, r5 / rl
    return result


def eval_report(
    model: nn.Module,
    source: ImageSource | None,
    *,
    model_source: str,
    reference: nn.Module | None = None,
    reference_source: str | None = None,
    settings: RunSettings | None = None,
    batch_size: int = 64,
    workers: int = 0,
    speed: bool = True,
    runs: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Everything `vitshrink eval` reports, as a JSON-ready dict."""
    from vitshrink import __version__
    from vitshrink.measure import measure_model
    from vitshrink.report import machine_info, now_iso

    settings = settings or RunSettings()
    report: dict[str, Any] = {
        "vitshrink_version": __version__,
        "created": now_iso(),
        "machine": machine_info(settings.device),
        "settings": {"device": settings.device, "amp": settings.amp, "channels_last": settings.channels_last,
                     "compile": settings.compile, "batch_size": batch_size},
        "model": {
            "source": model_source,
            "architecture": getattr(model, "pretrained_cfg", {}).get("architecture"),
            "methods": [m["name"] for m in getattr(model, "vitshrink_config", {}).get("methods", [])],
        },
    }
    if reference is not None:
        report["reference"] = {"source": reference_source}
    if source is not None:
        acc = evaluate(model, source, reference=reference, settings=settings, batch_size=batch_size,
                       workers=workers, progress=progress)
        report["data"] = {"source": source.name, "images": acc.images, "skipped": acc.skipped}
        report["accuracy"] = acc.to_dict()
    report.update(measure_model(model, settings, batch_size=batch_size, runs=runs, speed=speed))
    return report
