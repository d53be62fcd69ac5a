"""Recipe fields that declare their valid range next to their default; :func:`check_ranges` enforces them."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any

from dparallel.core.errors import require


def ranged(default: Any, low: float | None = None, high: float | None = None, *, above: bool = False,
           below: bool = False) -> Any:  # fmt: skip
    """A dataclass field whose value must lie in [low, high]: ``above`` makes the low end open (> low), ``below`` the
    high end (< high). ``None`` (an unset optional) always passes."""
    return field(default=default, metadata={"range": (low, high, above, below)})


def _describe(low, high, above: bool, below: bool) -> str:
    if high is None:
        return f"{'>' if above else '>='} {low}"
    if low is None:
        return f"{'<' if below else '<='} {high}"
    return f"in {'(' if above else '['}{low}, {high}{')' if below else ']'}"


def check_ranges(cls: type, node: Any, prefix: str = "") -> None:
    """One-line error for the first value of ``node`` (a config of dataclass ``cls``) outside its field's range."""
    for f in dataclasses.fields(cls):
        value = getattr(node, f.name, None) if not isinstance(node, dict) else node.get(f.name)
        if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
            check_ranges(f.type, value, f"{prefix}{f.name}.")
            continue
        item = (typing.get_args(f.type) or (None,))[0] if typing.get_origin(f.type) is list else None
        if dataclasses.is_dataclass(item):  # a list of sections (eval.decoders)
            for i, entry in enumerate(value or ()):
                check_ranges(item, entry, f"{prefix}{f.name}[{i}].")
            continue
        if "range" not in f.metadata or value is None:
            continue
        low, high, above, below = f.metadata["range"]
        ok = (low is None or (value > low if above else value >= low)) and (
            high is None or (value < high if below else value <= high)
        )
        require(ok, f"{prefix}{f.name}={value} must be {_describe(low, high, above, below)}")
