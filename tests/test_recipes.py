"""Shipped recipes load, name valid methods and knobs, and rewrite the models they are for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitshrink.compress import apply_methods
from vitshrink.errors import VitshrinkError
from vitshrink.methods import CalibrationContext, parse_method_string
from vitshrink.recipes import load_recipe
from vitshrink.sources import load_model

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    assert {p.stem for p in RECIPES} >= {"deit_tiny", "deit_small", "deit_base", "fashion-vit"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_rewrites_its_model(path: Path) -> None:
    recipe = load_recipe(path.stem)
    names = parse_method_string(recipe["method"])
    if recipe["model"] == "deit_base":
        pytest.skip("deit_base is too large for a unit test; deit_tiny/deit_small share its knobs")
    model = load_model(recipe["model"], pretrained=False) if recipe["model"] != "vitshrink:fashion-vit" else load_model(
        recipe["model"])
    size = model.pretrained_cfg["input_size"] if recipe["model"] != "vitshrink:fashion-vit" else (3, 32, 32)
    calib = torch.randn(8, *size)
    applied = apply_methods(model, names, recipe.get("knobs") or {}, CalibrationContext(images=calib))
    assert [a["name"] for a in applied] == names
    with torch.no_grad():
        assert model.eval()(calib[:1]).shape == (1, model.num_classes)


def test_bad_recipe(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dgssa\nfinetune: {stepz: 3}\n")
    with pytest.raises(VitshrinkError, match="unknown finetune key 'stepz'"):
        load_recipe(bad)
    bad.write_text("method: [dgssa\n")
    with pytest.raises(VitshrinkError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(VitshrinkError, match="No recipe 'nope'"):
        load_recipe("nope")
