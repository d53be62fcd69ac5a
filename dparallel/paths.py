"""Where the repository's recipes live (the package is installed editable from a checkout)."""

from __future__ import annotations

from pathlib import Path

from dparallel.errors import require


def recipes_dir() -> Path:
    """The checkout's ``recipes/`` folder."""
    folder = Path(__file__).resolve().parent.parent / "recipes"
    require(folder.is_dir(), f"no recipes folder at {folder}: install dparallel from a checkout (pip install -e .)")
    return folder
