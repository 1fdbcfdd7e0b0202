"""Data sources resolve to the right images and labels; bad data is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import tiny_vit, write_images
from vitshrink.data import UNLABELLED, load_images, make_transform, resolve_data
from vitshrink.errors import VitshrinkError


def test_metadata_csv_folder(image_folder: Path) -> None:
    source = resolve_data(image_folder)
    assert len(source) == 12 and source.labelled
    assert source.labels[:3] == [0, 1, 2]


def test_class_subfolders(tmp_path: Path) -> None:
    write_images(tmp_path / "b_cat", 2, metadata=False)
    write_images(tmp_path / "a_dog", 3, metadata=False)
    source = resolve_data(tmp_path)
    assert sorted(source.labels) == [0, 0, 0, 1, 1]
    assert source.ids[0].startswith("a_dog/")


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    write_images(tmp_path, 4, metadata=False)
    source = resolve_data(tmp_path)
    assert source.labels == [UNLABELLED] * 4 and not source.labelled


def test_num_samples_is_deterministic(image_folder: Path) -> None:
    a = resolve_data(image_folder, num_samples=5)
    b = resolve_data(image_folder, num_samples=5)
    assert a.ids == b.ids and len(a) == 5


def test_split_is_disjoint(image_folder: Path) -> None:
    train, held = resolve_data(image_folder).split(0.5)
    assert not set(train.ids) & set(held.ids)
    assert len(train) + len(held) == 12


def test_saved_datasets_folder(tmp_path: Path) -> None:
    import datasets

    images = [Image.new("RGB", (20, 20), (i * 20, 0, 0)) for i in range(5)]
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 2, 3, 4]}, features=datasets.Features(
        {"img": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    source = resolve_data(tmp_path / "ds")
    assert len(source) == 5 and source.labels == [0, 1, 2, 3, 4]
    with pytest.raises(VitshrinkError, match="--image-key"):
        resolve_data(tmp_path / "ds", image_key="picture")


def test_transform_comes_from_the_model() -> None:
    model = tiny_vit()
    tensor = make_transform(model)(Image.new("RGB", (50, 40)))
    assert tuple(tensor.shape) == (3, 32, 32)


def test_corrupt_image_is_skipped_with_a_warning(image_folder: Path) -> None:
    (image_folder / "img_003.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="img_003.png"):
        images, skipped = load_images(resolve_data(image_folder), tiny_vit())
    assert skipped == ["img_003.png"] and len(images) == 11


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "not a folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "No images found"),
    ],
)
def test_bad_sources(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(VitshrinkError, match=message):
        resolve_data(make(tmp_path))


def test_label_outside_classes(tmp_path: Path) -> None:
    write_images(tmp_path, 3, labels=[0, 1, 12])
    with pytest.raises(VitshrinkError, match="Label 12 .* outside the model's 10 classes"):
        resolve_data(tmp_path).check_labels(10)


def test_imagenet_val_offline_without_local_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VITSHRINK_IMAGENET_VAL", raising=False)
    monkeypatch.setenv("VITSHRINK_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitshrinkError, match="VITSHRINK_IMAGENET_VAL"):
        resolve_data("imagenet-val")


def test_imagenet_val_from_env_and_config(monkeypatch: pytest.MonkeyPatch, image_folder: Path, tmp_path: Path) -> None:
    monkeypatch.setenv("VITSHRINK_IMAGENET_VAL", str(image_folder))
    assert len(resolve_data("imagenet-val")) == 12
    monkeypatch.delenv("VITSHRINK_IMAGENET_VAL")
    config = tmp_path / "config.toml"
    config.write_text(f'[data]\n"imagenet-val" = "{image_folder}"\n')
    monkeypatch.setenv("VITSHRINK_CONFIG", str(config))
    assert resolve_data("imagenet-val").name == "imagenet-val"
