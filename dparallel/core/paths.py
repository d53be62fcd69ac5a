"""Where the shipped recipes live: the checkout's ``recipes/``, installed as the package data ``dparallel.recipes``
(so ``pip install dparallel`` without a checkout runs ``dparallel quickstart`` from any folder)."""

from __future__ import annotations

import importlib
from pathlib import Path

from dparallel.core.errors import require


def recipes_dir() -> Path:
    """The folder holding ``tiny/``, ``llada-8b/`` ... recipes."""
    folder = Path(importlib.import_module("dparallel.recipes").__file__).parent
    require(folder.is_dir(), f"no recipes at {folder}: reinstall dparallel (its recipes ship as package data)")
    return folder
