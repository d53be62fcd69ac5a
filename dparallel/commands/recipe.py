"""Recipes: one YAML file merged, with ``key=value`` overrides, over typed section dataclasses.

A recipe holds ``name``, ``run_dir``, ``method`` and only the sections it uses: the ones its file names, its
method's (``registry.METHODS[method].sections``), and the ones the command reads (``registry.COMMAND_SECTIONS``).
Each section is a dataclass in a torch-free module named in ``registry.SECTIONS``; the docstring under a field is
its help text. Unknown keys, wrong types and bad values are reported on one line naming the key (and the closest
valid key).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dparallel.core import registry
from dparallel.core.errors import DParallelError, first_line, require
from dparallel.core.fields import check_ranges
from dparallel.core.paths import RUN_DIR_DEFAULT

COMMON = (("name", str, "recipe"), ("run_dir", str, RUN_DIR_DEFAULT), ("method", str, ""))
COMMON_HELP = {
    "name": "the run's name (default: the recipe file's stem)",
    "run_dir": "where checkpoints, logs, reports and the model go",
    "method": f"the training method `train` runs: {' | '.join(registry.METHODS)}",
}


def section_names(command: str | None, file: DictConfig | None, overrides: list[str]) -> list[str]:
    """The sections of a recipe: ``model``, the command's, the method's, and those its file or overrides name."""
    method = _method_of(file, overrides)
    names = {"model", *registry.COMMAND_SECTIONS.get(command or "", ())}
    if method:
        names |= set(registry.method(method).sections)
    named = [k for k in (file or {}) if k not in dict.fromkeys(c[0] for c in COMMON)]
    named += [o.split("=", 1)[0].split(".", 1)[0] for o in overrides if "." in o.split("=", 1)[0]]
    for key in named:
        require(
            key in registry.SECTIONS,
            f"unknown recipe key '{key}'{_close(key, registry.SECTIONS)}: remove it or fix its spelling",
        )
    return [s for s in registry.SECTIONS if s in names | set(named)]


def _method_of(file: DictConfig | None, overrides: list[str]) -> str:
    method = str((file or {}).get("method", "") or "")
    for o in overrides:
        if o.startswith("method="):
            method = o.split("=", 1)[1]
    return method


def recipe_schema(sections: list[str]) -> Any:
    """The Recipe dataclass: the common keys plus one field per section."""
    fields = [(n, t, dataclasses.field(default=d)) for n, t, d in COMMON]
    for name in sections:
        cls = registry.resolve(registry.SECTIONS[name])
        _resolve_types(cls)
        fields.append((name, cls, dataclasses.field(default_factory=cls)))
    return dataclasses.make_dataclass("Recipe", fields)


def _resolve_types(cls: Any) -> None:
    """``from __future__`` leaves string annotations; resolve them so nested sections can be walked."""
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        if dataclasses.is_dataclass(f.type):
            _resolve_types(f.type)


def _read(path: str) -> DictConfig:
    file = Path(path)
    if not file.is_file():
        raise DParallelError(f"recipe {path} not found: pass the path of a YAML file (see recipes/)")
    try:
        layer = OmegaConf.load(file)
    except Exception as e:  # yaml.YAMLError and friends: name the file, not a traceback
        raise DParallelError(f"recipe {path} is not valid YAML: {first_line(e)}") from None
    require(isinstance(layer, DictConfig), f"recipe {path} is not a mapping of sections")
    if "name" not in layer:
        layer.name = file.stem
    return layer


def load_recipe(path: str | None, overrides: list[str] = (), command: str | None = None) -> DictConfig:
    """Merge a recipe file and ``key=value`` overrides over its sections' schema. Raises DParallelError on bad
    input. ``command`` adds the sections that command reads (``registry.COMMAND_SECTIONS``)."""
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise DParallelError(f"override {item!r} is not key=value: write e.g. train.lr=1e-4")
    file = _read(path) if path is not None else None
    schema = recipe_schema(section_names(command, file, overrides))
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(schema), *([file] if file else []), OmegaConf.from_dotlist(overrides)
        )
        OmegaConf.resolve(cfg)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as e:
        raise DParallelError(_describe(e, schema)) from None
    for section in cfg:
        if section in registry.SECTIONS:
            check_ranges(registry.resolve(registry.SECTIONS[section]), cfg[section], f"{section}.")
    return cfg


def _describe(e: OmegaConfBaseException, schema: Any) -> str:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ConfigKeyError) or "not in" in str(e):
        name = str(e).split("'")[1] if "'" in str(e) else key
        full = key or name
        return f"unknown recipe key '{full}'{_close(full, _valid_keys(schema))}: remove it or fix its spelling"
    return f"bad value for recipe key '{key}': {first_line(e)}"


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        keys.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
            keys += _valid_keys(f.type, f"{prefix}{f.name}.")
    return keys


def _close(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (and of its dataclass bases): its help text."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(inspect.getsource(klass).strip()).body[0].body
        except (OSError, TypeError, IndexError, AttributeError):
            continue
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
                if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                    docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_keys(cfg: DictConfig) -> list[tuple[str, str, str]]:
    """(dotted key, value in this recipe, help) for every key of ``cfg``'s sections, for ``--help``."""
    rows = [(name, str(cfg.get(name)), COMMON_HELP[name]) for name, _, _ in COMMON]
    for section in cfg:
        if section in registry.SECTIONS:
            rows += _rows(registry.resolve(registry.SECTIONS[section]), cfg[section], f"{section}.")
    return rows


def _rows(cls: type, node: DictConfig, prefix: str) -> list[tuple[str, str, str]]:
    docs, rows = field_docs(cls), []
    for f in dataclasses.fields(cls):
        value = node.get(f.name)
        if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
            rows += _rows(f.type, value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", str(_plain(value)), docs.get(f.name, "")))
    return rows


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def point_name(point: dict) -> str:
    """A sweep point's folder name: its parameters' last key parts and values (``lr=0.001-hidden_size=32``)."""
    return "-".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items())


def open_run_dir(cfg: DictConfig) -> Path:
    """The recipe's ``run_dir``, created if missing. Under a wandb sweep agent (``WANDB_SWEEP_ID``) a recipe with a
    sweep block trains in RUN_DIR/<point name>, so no two points share a folder (or a checkpoint)."""
    import os

    params = cfg.get("sweep", {}).get("parameters") or {}
    if os.environ.get("WANDB_SWEEP_ID") and params:
        name = point_name({key: OmegaConf.select(cfg, key) for key in params})
        if Path(cfg.run_dir).name != name:  # once: a second call keeps the point's folder
            cfg.run_dir = str(Path(cfg.run_dir) / name)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
