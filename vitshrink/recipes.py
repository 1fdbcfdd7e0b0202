"""Recipes: YAML files holding a method string, its knobs and fine-tune settings.

```yaml
model: deit_small            # optional: the model the recipe was tuned for
method: dgssa+glad
knobs:
  dgssa: {layers: auto}
  glad: {layers: [6, 9], tokens: [98, 49]}
finetune: {steps: 300, lr: 1.0e-4, batch_size: 32}
calibration: {num_calib: 256, eval_fraction: 0.5, analysis_images: 64}
```

A recipe name without a path (``--recipe deit_small``) is looked up in the ``recipes/`` folder of
the source tree and in the recipes shipped with the package.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from vitshrink.errors import VitshrinkError
from vitshrink.finetune import FinetuneConfig

RECIPE_DIRS = [Path(__file__).parent / "recipes", Path(__file__).parent.parent / "recipes"]
TOP_LEVEL = {"model", "method", "knobs", "finetune", "calibration", "description"}
CALIBRATION_KEYS = {"num_calib", "eval_fraction", "analysis_images", "num_eval", "calib", "eval_data", "bench_batch_size",
                    "bench_rounds"}


def find_recipe(name: str | Path) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise VitshrinkError(f"Recipe '{path}' does not exist.")
        return path
    for folder in RECIPE_DIRS:
        for suffix in (".yaml", ".yml"):
            if (candidate := folder / f"{name}{suffix}").is_file():
                return candidate
    known = sorted({p.stem for folder in RECIPE_DIRS if folder.is_dir() for p in folder.glob("*.y*ml")})
    raise VitshrinkError(f"No recipe '{name}': give a .yaml path or one of: {', '.join(known) or '(none)'}.")


def load_recipe(name: str | Path) -> dict[str, Any]:
    """Read and check a recipe; unknown keys are errors (a typo must not be silently ignored)."""
    path = find_recipe(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VitshrinkError(f"Recipe '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise VitshrinkError(f"Recipe '{path}' must be a mapping with keys {', '.join(sorted(TOP_LEVEL))}.")
    if unknown := set(data) - TOP_LEVEL:
        raise VitshrinkError(f"Recipe '{path}': unknown key '{sorted(unknown)[0]}'; allowed: {', '.join(sorted(TOP_LEVEL))}.")
    ft_fields = {f.name for f in fields(FinetuneConfig)}
    if unknown := set(data.get("finetune") or {}) - ft_fields:
        raise VitshrinkError(f"Recipe '{path}': unknown finetune key '{sorted(unknown)[0]}'; allowed: {', '.join(sorted(ft_fields))}.")
    if unknown := set(data.get("calibration") or {}) - CALIBRATION_KEYS:
        raise VitshrinkError(
            f"Recipe '{path}': unknown calibration key '{sorted(unknown)[0]}'; allowed: {', '.join(sorted(CALIBRATION_KEYS))}."
        )
    if "method" not in data:
        raise VitshrinkError(f"Recipe '{path}' has no 'method' (e.g. method: dgssa+glad).")
    data["path"] = str(path)
    return data
