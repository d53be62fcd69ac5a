"""Where the shipped recipes live: the checkout's ``recipes/``, installed as the package data ``dparallel.recipes``
(so ``pip install dparallel`` without a checkout runs ``dparallel quickstart`` from any folder)."""

from __future__ import annotations

import importlib
from pathlib import Path

from dparallel.core.errors import require

RUN_DIR_DEFAULT = "runs/${name}"  # a recipe's run_dir unless it sets one; training writes its model to RUN_DIR/model


def recipes_dir() -> Path:
    """The folder holding ``tiny/``, ``llada-8b/`` ... recipes."""
    folder = Path(importlib.import_module("dparallel.recipes").__file__).parent
    require(folder.is_dir(), f"no recipes at {folder}: reinstall dparallel (its recipes ship as package data)")
    return folder


def recipe_writing(folder: str) -> str | None:
    """The shipped recipe whose training writes ``folder`` (its ``run_dir``/model), as ``recipes/<path>``; None when
    no shipped recipe does. Lets a missing ``model.path`` name the command that makes it."""
    import yaml

    root, target = recipes_dir(), Path(folder)
    for file in sorted(root.rglob("*.yaml")):
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError:
            continue
        if not isinstance(data, dict) or not data.get("method"):
            continue
        run_dir = data.get("run_dir") or RUN_DIR_DEFAULT.replace("${name}", data.get("name") or file.stem)
        if Path(run_dir) / "model" == target:
            return f"recipes/{file.relative_to(root)}"
    return None
