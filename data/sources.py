"""Prompt sources (custom data) and answer checkers for recording.

A source is a jsonl/json, csv or parquet file, a folder written by ``datasets``' ``save_to_disk``, a Hub dataset
id (``owner/name``, with ``revision`` and ``split``), or the built-in synthetic suite; ``datasets`` reads them
all. Columns are mapped by name (``prompt``, optional ``answer`` and ``id``); repeated prompts are dropped by hash.
A checker marks each teacher output correct or not, so wrong ones can be filtered out.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dparallel.core.errors import DParallelError, first_line, require
from dparallel.data.config import CHECKERS, KINDS


@dataclass(frozen=True)
class Item:
    """One prompt to record: its id, text, reference answer (or None) and, for the suite, its task."""

    id: str
    prompt: str
    answer: str | None = None
    task: str | None = None


def resolve_kind(src) -> str:
    require(src.kind in KINDS, f"record.source.kind={src.kind!r}: choose from {', '.join(KINDS)}")
    if src.kind != "auto":
        return src.kind
    if src.path is None:
        return "suite"
    path = Path(src.path)
    if path.is_dir():
        return "hf"
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", src.path) and not path.suffix:
        return "hub"  # owner/name, not a local path
    suffix = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix.lower())
    require(
        suffix is not None,
        f"cannot tell the format of {src.path} from its name: set record.source.kind (jsonl, csv, parquet, hf)",
    )
    return suffix


def source_name(src) -> str:
    kind = resolve_kind(src)
    return f"suite:{src.suite.split}" if kind == "suite" else f"{kind}:{Path(src.path).name}"


def load_items(src, dedup: bool = True) -> list[Item]:
    """The prompts of a source, in source order, deduplicated by prompt hash (first kept) and limited."""
    kind = resolve_kind(src)
    if kind == "suite":
        from dparallel.data.suite import make_split

        s = src.suite
        try:
            examples = make_split(list(s.tasks), s.split, s.n_per_task, s.seed)
        except ValueError as e:
            raise DParallelError(f"record.source.suite: {e}") from None
        items = [Item(f"{e.task}/{e.split}/{e.index}", e.prompt, e.answer, e.task) for e in examples]
    else:
        require(src.path is not None, f"record.source.kind={kind} needs record.source.path")
        path = Path(src.path)
        require(kind == "hub" or path.exists(), f"prompt source {path} not found: check record.source.path")
        rows, columns = _read_rows(path, kind, src.split, src.revision)
        items = _map_columns(path, rows, columns, src)
    if dedup:
        seen, unique = set(), []
        for it in items:
            h = hashlib.sha256(it.prompt.encode()).digest()
            if h not in seen:
                seen.add(h)
                unique.append(it)
        items = unique
    if src.limit is not None:
        require(src.limit > 0, f"record.source.limit={src.limit} must be positive")
        items = items[: src.limit]
    require(len(items) > 0, f"prompt source {source_name(src)} holds no prompts")
    return items


_BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}  # kind -> datasets' packaged builder


def _read_rows(path: Path, kind: str, split: str | None, revision: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows as dicts and the column names, through ``datasets``: ``load_dataset`` for files (json/jsonl, csv,
    parquet) and Hub ids (with ``revision``/``split``), ``load_from_disk`` for a saved folder."""
    import datasets
    from datasets import DatasetDict

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        if kind == "hf":
            ds = datasets.load_from_disk(str(path))
        elif kind == "hub":
            ds = datasets.load_dataset(str(path), revision=revision)
        else:
            ds = datasets.load_dataset(_BUILDERS[kind], data_files=str(path))
    except Exception as e:  # a malformed file, a foreign folder, an unknown or unreachable Hub id: one line
        raise DParallelError(_unreadable(path, kind, e)) from None
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()
    if isinstance(ds, DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        require(pick in ds, f"{path} has splits {', '.join(names)}: set record.source.split")
        ds = ds[pick]
    return ds.to_list(), ds.column_names


def _unreadable(path: Path, kind: str, error: Exception) -> str:
    if kind == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"cannot load the Hub dataset {path} with HF_HUB_OFFLINE=1: unset it, or save the dataset locally"
    what = {"hf": "a saved Hugging Face dataset", "hub": "a Hub dataset"}.get(kind, f"a {kind} file")
    return f"{path} cannot be read as {what} ({first_line(error)})"


def _map_columns(path: Path, rows: list[dict], columns: list[str] | None, src) -> list[Item]:
    def need(col: str, where: str, have) -> None:
        require(
            col in have,
            f"{where} has no column '{col}' (columns: {', '.join(map(str, have))}): "
            f"set record.source.{'prompt' if col == src.prompt_column else 'id'}_column",
        )

    if columns is not None:
        need(src.prompt_column, str(path), columns)
        if src.id_column:
            need(src.id_column, str(path), columns)
    items = []
    for n, row in enumerate(rows):
        where = f"{path}:{n + 1}"
        need(src.prompt_column, where, list(row))
        if src.id_column:
            need(src.id_column, where, list(row))
        answer = row.get(src.answer_column) if src.answer_column else None
        prompt = row[src.prompt_column]
        require(isinstance(prompt, str), f"{where}: column '{src.prompt_column}' is not text")
        ident = str(row[src.id_column]) if src.id_column else str(n)
        items.append(Item(ident, prompt, None if answer is None else str(answer)))
    return items


# ---- checkers -------------------------------------------------------------------------------------------------

Checker = Callable[[Item, str], bool]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in a text (commas dropped), or None."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _exact(item: Item, output: str) -> bool:
    return output.strip() == (item.answer or "").strip()


def _last_number(item: Item, output: str) -> bool:
    want, got = last_number(item.answer or ""), last_number(output)
    return want is not None and got is not None and abs(want - got) < 1e-6


def _suite(item: Item, output: str) -> bool:
    from dparallel.data.suite import is_correct

    return is_correct(item.task, item.prompt, output)


def build_checker(spec: str, src, items: list[Item]) -> Checker | None:
    """``auto`` (the suite's own checker for the suite, none otherwise) | ``none`` | ``exact`` | ``last_number``
    | ``suite`` | ``module:function`` (called as ``function(prompt, output, answer) -> bool``)."""
    kind = resolve_kind(src)
    if spec == "auto":
        spec = "suite" if kind == "suite" else "none"
    if spec == "none":
        return None
    if spec == "suite":
        require(kind == "suite", "record.checker=suite needs the suite source: use exact, last_number or module:func")
        return _suite
    if spec in ("exact", "last_number"):
        missing = sum(it.answer is None for it in items)
        where = src.path if kind != "suite" else source_name(src)
        require(
            missing == 0,
            f"record.checker={spec} needs reference answers: {missing} prompt(s) of {where} have no "
            f"'{src.answer_column}' column: set record.source.answer_column or record.checker=none",
        )
        return _exact if spec == "exact" else _last_number
    require(
        ":" in spec,
        f"record.checker={spec!r}: choose from {', '.join(CHECKERS)} or a Python callable module:function",
    )
    module_name, func_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise DParallelError(f"record.checker={spec!r} cannot be imported ({e})") from None
    require(callable(fn), f"record.checker={spec!r} is not callable")
    return lambda item, output: bool(fn(item.prompt, output, item.answer))
