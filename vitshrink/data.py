"""Data sources for evaluation, calibration and fine-tuning, with the model's own timm preprocessing.

A source is one of:

* a local image folder: the ``datasets`` imagefolder layout (images + ``metadata.csv`` with
  ``file_name,label``), class subfolders (torchvision ImageFolder), or a flat folder of images
  (unlabelled: agreement metrics only);
* a local ``datasets`` folder written by ``save_to_disk``, or a Hugging Face dataset id;
* a named alias (:data:`ALIASES`), e.g. ``imagenet-val``.
"""

from __future__ import annotations

import csv
import io
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from vitshrink.errors import VitshrinkError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
UNLABELLED = -1
EMBEDDED_DATA = Path(__file__).parent / "embedded"


@dataclass(frozen=True)
class DataAlias:
    """A name users type for a data set, resolved to a local folder or a Hub dataset."""

    description: str
    env: str | None = None
    """Environment variable holding a local path (most users keep ImageNet on disk)."""
    local: Callable[[], Path | None] | None = None
    hub_id: str | None = None
    hub_split: str | None = None


def _assets_path(*parts: str) -> Path | None:
    root = os.environ.get("VITSHRINK_ASSETS")
    return Path(root, *parts) if root else None


ALIASES: dict[str, DataAlias] = {
    "imagenet-val": DataAlias(
        "ImageNet-1k validation set (50,000 images)",
        env="VITSHRINK_IMAGENET_VAL",
        hub_id="ILSVRC/imagenet-1k",
        hub_split="validation",
    ),
    "imagenet-sample-dev": DataAlias(
        "500 ImageNet images, one per even class index (the project's shared assets)",
        env="VITSHRINK_IMAGENET_SAMPLE_DEV",
        local=lambda: _assets_path("imagenet-sample-dev"),
    ),
    "fashion-mnist-sample": DataAlias(
        "Fashion-MNIST slice shipped with vitshrink (--split train|test; MIT licence)",
        local=lambda: EMBEDDED_DATA / "fashion_mnist_sample",
    ),
}


def _config_file_paths() -> dict[str, str]:
    """`[data]` table of ~/.config/vitshrink/config.toml: alias = "/local/path"."""
    import tomllib

    path = Path(os.environ.get("VITSHRINK_CONFIG", Path.home() / ".config" / "vitshrink" / "config.toml"))
    if not path.is_file():
        return {}
    try:
        return {str(k): str(v) for k, v in tomllib.loads(path.read_text()).get("data", {}).items()}
    except tomllib.TOMLDecodeError as exc:
        raise VitshrinkError(f"'{path}' is not valid TOML ({exc}): fix or remove it.") from exc


@dataclass
class ImageSource:
    """A resolved list of images: how to open each one, and its label (or UNLABELLED)."""

    name: str
    openers: list[Callable[[], Image.Image]]
    labels: list[int]
    ids: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.openers)

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and all(label != UNLABELLED for label in self.labels)

    def subset(self, indices: Sequence[int], name: str | None = None) -> ImageSource:
        return ImageSource(
            name or self.name,
            [self.openers[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.ids[i] for i in indices],
        )

    def take(self, num_samples: int | None, seed: int = 0) -> ImageSource:
        """A deterministic subset of ``num_samples`` images (seeded shuffle, then the first n)."""
        if num_samples is None or num_samples >= len(self):
            return self
        if num_samples <= 0:
            raise VitshrinkError(f"--num-samples must be positive, got {num_samples}.")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return self.subset(sorted(order[:num_samples]))

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageSource, ImageSource]:
        """Deterministic (first, rest) split with ``fraction`` of the images in the first part."""
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        cut = max(1, min(len(self) - 1, round(len(self) * fraction)))
        return (
            self.subset(sorted(order[:cut]), f"{self.name}[train]"),
            self.subset(sorted(order[cut:]), f"{self.name}[held-out]"),
        )

    def check_labels(self, num_classes: int) -> None:
        bad = [(i, label) for i, label in enumerate(self.labels) if label != UNLABELLED and not 0 <= label < num_classes]
        if bad:
            i, label = bad[0]
            raise VitshrinkError(
                f"Label {label} of '{self.ids[i]}' is outside the model's {num_classes} classes "
                f"({len(bad)} such images): check the labels or the model."
            )


def _file_opener(path: Path) -> Callable[[], Image.Image]:
    return lambda: Image.open(path)


def _bytes_opener(data: bytes) -> Callable[[], Image.Image]:
    return lambda: Image.open(io.BytesIO(data))


def resolve_data(
    src: str | os.PathLike,
    *,
    split: str | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> ImageSource:
    """Resolve a data source string to an :class:`ImageSource`; one-line errors for bad input."""
    text = str(src)
    if text in ALIASES:
        source = _resolve_alias(text, split=split, image_key=image_key, label_key=label_key)
    else:
        path = Path(text).expanduser()
        if path.exists():
            source = _from_path(path, split=split, image_key=image_key, label_key=label_key)
        elif os.sep in text.strip("/") and text.count("/") == 1 and not text.startswith((".", "/", "~")):
            source = _from_hub(text, split=split, image_key=image_key, label_key=label_key)
        else:
            close = [a for a in ALIASES if a.split("-")[0] in text]
            hint = f" Known names: {', '.join(ALIASES)}." if not close else f" Did you mean {close[0]}?"
            raise VitshrinkError(
                f"Data source '{text}' is not a folder, a Hub dataset id (org/name) or a known name.{hint}"
            )
    if len(source) == 0:
        raise VitshrinkError(f"No images found in '{text}': check the path (supported: {', '.join(sorted(IMAGE_SUFFIXES))}).")
    return source.take(num_samples, seed=seed)


def _resolve_alias(name: str, **kwargs: Any) -> ImageSource:
    alias = ALIASES[name]
    configured = os.environ.get(alias.env) if alias.env else None
    configured = configured or _config_file_paths().get(name)
    local = Path(configured) if configured else (alias.local() if alias.local else None)
    if local is not None:
        if not local.exists():
            raise VitshrinkError(f"'{name}' points to '{local}', which does not exist: fix the path or unset it.")
        source = _from_path(local, **kwargs)
        source.name = name
        return source
    if alias.hub_id:
        from vitshrink.sources import is_offline

        how = f"set {alias.env}=/path/to/it" if alias.env else "point to a local copy"
        if is_offline():
            raise VitshrinkError(
                f"'{name}' has no local copy and the Hub is offline (HF_HUB_OFFLINE=1): {how}, "
                "or pass a folder with --data."
            )
        kwargs["split"] = kwargs.get("split") or alias.hub_split
        try:
            return _from_hub(alias.hub_id, **kwargs)
        except VitshrinkError as exc:
            raise VitshrinkError(f"{exc} ({name}: {how} to use a local copy instead.)") from exc
    env_hint = f"set {alias.env}" if alias.env else "set VITSHRINK_ASSETS"
    raise VitshrinkError(f"'{name}' ({alias.description}) has no local copy: {env_hint} to its folder.")


def _from_path(path: Path, *, split: str | None, image_key: str | None, label_key: str | None) -> ImageSource:
    if path.is_file():
        raise VitshrinkError(f"'{path}' is a file: --data takes a folder of images or a dataset.")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return _from_saved_dataset(path, split=split, image_key=image_key, label_key=label_key)
    if split and (path / split).is_dir():
        path = path / split
    elif not split and not _has_images(path) and (path / "test").is_dir():
        path = path / "test"
    elif split and not (path / split).is_dir() and any(
        (path / s).is_dir() for s in ("train", "test", "validation", "val")
    ):
        raise VitshrinkError(f"'{path}' has no split '{split}': use one of its sub-folders.")
    if (path / "metadata.csv").is_file():
        return _from_metadata_csv(path)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and any(_has_images(d) for d in subdirs):
        return _from_class_folders(path, subdirs)
    return _from_flat_folder(path)


def _has_images(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file())


def _from_metadata_csv(path: Path) -> ImageSource:
    openers, labels, ids = [], [], []
    with (path / "metadata.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise VitshrinkError(f"'{path / 'metadata.csv'}' needs a 'file_name' column (and 'label' for accuracy).")
        label_col = "label" if "label" in reader.fieldnames else None
        for row in reader:
            file = path / row["file_name"]
            if not file.is_file():
                raise VitshrinkError(f"metadata.csv lists '{row['file_name']}', which is not in '{path}'.")
            try:
                label = int(row[label_col]) if label_col and row[label_col] != "" else UNLABELLED
            except ValueError:
                raise VitshrinkError(
                    f"metadata.csv label '{row[label_col]}' for '{row['file_name']}' is not a class index."
                ) from None
            openers.append(_file_opener(file))
            labels.append(label)
            ids.append(row["file_name"])
    return ImageSource(str(path), openers, labels, ids)


def _from_class_folders(path: Path, subdirs: list[Path]) -> ImageSource:
    openers, labels, ids = [], [], []
    for index, folder in enumerate(subdirs):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                openers.append(_file_opener(file))
                labels.append(index)
                ids.append(f"{folder.name}/{file.name}")
    return ImageSource(str(path), openers, labels, ids)


def _from_flat_folder(path: Path) -> ImageSource:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return ImageSource(str(path), [_file_opener(f) for f in files], [UNLABELLED] * len(files), [f.name for f in files])


def _from_saved_dataset(path: Path, **kwargs: Any) -> ImageSource:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise VitshrinkError(f"Could not read the datasets folder '{path}': {exc}") from exc
    return _from_hf_dataset(ds, str(path), **kwargs)


def _from_hub(dataset_id: str, *, split: str | None, image_key: str | None, label_key: str | None) -> ImageSource:
    import datasets

    from vitshrink.sources import is_offline

    try:
        ds = datasets.load_dataset(dataset_id, split=split or "validation")
    except Exception as exc:
        where = "offline (HF_HUB_OFFLINE=1) and not cached" if is_offline() else str(exc).splitlines()[0]
        raise VitshrinkError(f"Cannot load Hub dataset '{dataset_id}': {where}.") from exc
    return _from_hf_dataset(ds, dataset_id, split=split, image_key=image_key, label_key=label_key)


def _from_hf_dataset(ds: Any, name: str, *, split: str | None, image_key: str | None, label_key: str | None) -> ImageSource:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        chosen = split or next((s for s in ("validation", "test", "train") if s in ds), next(iter(ds)))
        if chosen not in ds:
            raise VitshrinkError(f"'{name}' has no split '{chosen}': choose --split from {', '.join(ds)}.")
        ds = ds[chosen]
    image_key = image_key or next(
        (k for k, f in ds.features.items() if isinstance(f, datasets.Image)), "image" if "image" in ds.features else None
    )
    if image_key not in ds.features:
        raise VitshrinkError(f"'{name}' has no image column '{image_key}': choose --image-key from {', '.join(ds.features)}.")
    if label_key is None:
        label_key = next((k for k in ("label", "labels", "class") if k in ds.features), None)
    elif label_key not in ds.features:
        raise VitshrinkError(f"'{name}' has no label column '{label_key}': choose --label-key from {', '.join(ds.features)}.")
    ds = ds.cast_column(image_key, datasets.Image(decode=False))
    openers, labels, ids = [], [], []
    for index, row in enumerate(ds):
        item = row[image_key]
        if item.get("bytes"):
            openers.append(_bytes_opener(item["bytes"]))
        else:
            openers.append(_file_opener(Path(item["path"])))
        labels.append(int(row[label_key]) if label_key else UNLABELLED)
        ids.append(item.get("path") or str(index))
    return ImageSource(name, openers, labels, ids)


class ImageDataset(Dataset):
    """Decoded, transformed images. Unreadable images yield ``ok=False`` so loops can skip them."""

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], torch.Tensor], input_size: Sequence[int]):
        self.source = source
        self.transform = transform
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            with self.source.openers[index]() as img:
                image = self.transform(img.convert("RGB"))
            return image, self.source.labels[index], True
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            warnings.warn(f"skipping unreadable image '{self.source.ids[index]}'", stacklevel=2)
            return torch.zeros(self.input_size), self.source.labels[index], False


class LabelledImages(Dataset):
    """(image, label) pairs of the readable images only: what training loops expect."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, _ = self.dataset[self.indices[index]]
        return image, label


def readable_indices(source: ImageSource) -> tuple[list[int], list[str]]:
    """Indices of images that open, and the ids of those that do not (with a warning each)."""
    good, bad = [], []
    for i, opener in enumerate(source.openers):
        try:
            with opener() as img:
                img.convert("RGB").load()
            good.append(i)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            bad.append(source.ids[i])
            warnings.warn(f"skipping unreadable image '{source.ids[i]}'", stacklevel=2)
    return good, bad


def data_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's own preprocessing settings (timm's data config), at the size the model takes now."""
    from timm.data import resolve_model_data_config
    from timm.models._input import get_model_input_config

    cfg = resolve_model_data_config(model)
    current = tuple(get_model_input_config(model)["input_size"])
    if current[1:] != tuple(cfg["input_size"])[1:]:  # built at another img_size than its pretrained_cfg says
        cfg["input_size"] = current
    return cfg


def make_transform(model: torch.nn.Module, *, training: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval (or training-augmentation) transform for ``model``."""
    from timm.data import create_transform

    cfg = data_config(model)
    if training:
        return create_transform(**cfg, is_training=True, hflip=0.5, color_jitter=None, auto_augment=None, re_prob=0.0)
    return create_transform(**cfg, is_training=False)


def make_dataset(source: ImageSource, model: torch.nn.Module, *, training: bool = False) -> ImageDataset:
    return ImageDataset(source, make_transform(model, training=training), data_config(model)["input_size"])


def make_loader(dataset: Dataset, *, batch_size: int, workers: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, pin_memory=False)


def load_images(source: ImageSource, model: torch.nn.Module) -> tuple[torch.Tensor, list[str]]:
    """All readable images of a (small) source as one preprocessed tensor, plus the skipped ids."""
    dataset = make_dataset(source, model)
    images, skipped = [], []
    for i in range(len(dataset)):
        image, _, ok = dataset[i]
        if ok:
            images.append(image)
        else:
            skipped.append(source.ids[i])
            warnings.warn(f"skipping unreadable image '{source.ids[i]}'", stacklevel=2)
    if not images:
        raise VitshrinkError(f"None of the {len(source)} images in '{source.name}' could be read.")
    return torch.stack(images), skipped
