"""Where the shipped recipes live: the checkout's ``recipes/``, installed as the package data ``dparallel.recipes``
(so ``pip install dparallel`` without a checkout runs ``dparallel quickstart`` from any folder)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dparallel.core.errors import require


def recipes_dir() -> Path:
    """The folder holding ``tiny/``, ``llada-8b/`` ... recipes."""
    folder = Path(str(resources.files("dparallel.recipes")))
    require(folder.is_dir(), f"no recipes at {folder}: reinstall dparallel (its recipes ship as package data)")
    return folder
