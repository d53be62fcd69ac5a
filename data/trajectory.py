"""The trajectory format: the one module that knows how recorded teacher runs are laid out, written and read.

A trajectory folder holds one Hugging Face ``datasets`` folder per shard (``shard-00000/``, written with
``save_to_disk``), a sidecar per shard (``shard-00000.json``: record counts and the shard's SHA-256, written
atomically *after* the shard, so a shard is finished exactly when its sidecar exists and matches), ``manifest.json``
(written last by rank 0: schema version, counts, config hash, the shard list with checksums) and, when recorded
here, the teacher's ``tokenizer/``.

One record per (prompt, teacher run):

- ``prompt_ids`` int32[P], ``tokens`` int32[G] (the teacher's final canvas), ``order`` int32[G] (the step at which
  each position was committed; several positions may share a step), ``steps`` (the row's steps, its NFE),
- ``meta``: source, id, task, prompt, reference answer, decoded output, correct (None when unchecked),
- with dense features: ``pred`` int32[steps, G] (argmax at each step), ``conf`` float16[steps, G] (its
  probability), ``entropy`` and ``margin`` float16[steps, G] (nats; top-1 minus top-2 probability), all taken
  *before* that step's commits, i.e. on the state :func:`state_at` gives. Folders recorded before ``entropy`` and
  ``margin`` existed read as before; only a consumer that needs them refuses them.

:func:`state_at` is the only code that reconstructs a state: ``x_s = where(order < s, tokens, MASK)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dparallel.core.errors import DParallelError, first_line, require
from dparallel.core.io import atomic_write_json

FORMAT = "dparallel.trajectories"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
META_FIELDS = ("source", "id", "task", "prompt", "answer", "output", "correct")


def state_at(tokens, order, s, mask_id: int):
    """The canvas before step ``s``: ``where(order < s, tokens, mask_id)``.

    Works on torch tensors and numpy arrays of any matching shape; ``s`` may be an int or broadcast against
    ``order`` (e.g. ``[B, 1]`` for one step per row). ``s = 0`` is the all-masked canvas, ``s = steps`` the final one.
    """
    try:
        import torch

        if isinstance(tokens, torch.Tensor):
            s = torch.as_tensor(s, device=order.device)
            return torch.where(order < s, tokens, torch.full_like(tokens, mask_id))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    tokens, order = np.asarray(tokens), np.asarray(order)
    return np.where(order < np.asarray(s), tokens, np.asarray(mask_id, dtype=tokens.dtype))


# Dense per-step features: name -> stored dtype. Each is [steps, G].
DENSE_FEATURES = {"pred": "int32", "conf": "float16", "entropy": "float16", "margin": "float16"}


def features(dense: bool | list[str]):
    """The ``datasets.Features`` of a record: with every :data:`DENSE_FEATURES` when ``dense`` is True, or with
    the ones it names."""
    from datasets import Features, Sequence, Value

    cols = {
        "prompt_ids": Sequence(Value("int32")),
        "tokens": Sequence(Value("int32")),
        "order": Sequence(Value("int32")),
        "steps": Value("int32"),
        "meta": {name: Value("bool") if name == "correct" else Value("string") for name in META_FIELDS},
    }
    if dense:
        names = DENSE_FEATURES if dense is True else dense
        cols.update({name: Sequence(Sequence(Value(DENSE_FEATURES[name]))) for name in names})
    return Features(cols)


def validate_record(r: dict, where: str = "record") -> None:
    """Check a record's shapes and ranges against the contract; raises DParallelError naming ``where``."""
    tokens, order = np.asarray(r["tokens"]), np.asarray(r["order"])
    steps = int(r["steps"])
    require(tokens.ndim == 1 and tokens.shape == order.shape, f"{where}: tokens and order differ in shape")
    require(order.size == 0 or (order.min() >= 0 and order.max() < steps), f"{where}: order outside [0, steps)")
    for name in DENSE_FEATURES:
        if r.get(name) is not None:
            arr = np.asarray(r[name])
            require(arr.shape == (steps, tokens.size), f"{where}: {name} is {arr.shape}, not {(steps, tokens.size)}")


# ---- shards ---------------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def sidecar_path(out: Path, index: int) -> Path:
    return Path(out) / f"{shard_name(index)}.json"


def dir_checksum(folder: Path) -> str:
    """SHA-256 over every file of a folder (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_shard(out: Path, index: int, records: list[dict], dense: bool, info: dict) -> dict:
    """Write shard ``index`` atomically (temp folder, then rename over any unfinished one), then its sidecar.

    ``info`` is merged into the sidecar (config hash, prompt counts, teacher ...). Returns the sidecar dict.
    """
    from datasets import Dataset
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the dense features the records carry (a folder recorded before entropy/margin existed is rewritten as it was)
    feats = features([k for k in DENSE_FEATURES if records and records[0].get(k) is not None] if dense else False)
    columns = {name: [r[name] for r in records] for name in feats}
    target = out / shard_name(index)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{target.name}.", suffix=".tmp"))
    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        Dataset.from_dict(columns, features=feats).save_to_disk(str(tmp / "data"), num_shards=1)
        (tmp / "data").chmod(0o755)
        if target.exists():  # an unfinished shard of a killed run (no sidecar): replace it
            shutil.rmtree(target)
        os.replace(tmp / "data", target)
    finally:
        if not quiet:
            enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
    sidecar = {
        "shard": target.name,
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        **info,
        "records": len(records),
        "checked": sum(r["meta"]["correct"] is not None for r in records),
        "correct": sum(r["meta"]["correct"] is True for r in records),
        "sha256": dir_checksum(target),
    }
    atomic_write_json(sidecar_path(out, index), sidecar)
    return sidecar


def clean_temp(out: Path, index: int) -> None:
    """Remove leftover temporary folders of shard ``index`` (from a killed run)."""
    for tmp in Path(out).glob(f".{shard_name(index)}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def _read_json(file: Path, what: str) -> dict:
    try:
        obj = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DParallelError(f"{file} is not a readable {what} ({type(e).__name__}): delete it and rerun") from None
    require(isinstance(obj, dict), f"{file} is not a {what}: expected a JSON object")
    return obj


def _check_version(obj: dict, file: Path) -> None:
    version = obj.get("schema_version")
    require(
        obj.get("format") == FORMAT,
        f"{file} is not a dparallel trajectory file (format {obj.get('format')!r}, expected {FORMAT!r})",
    )
    require(
        version == SCHEMA_VERSION,
        f"{file} has trajectory schema version {version}, this dparallel reads version {SCHEMA_VERSION}: "
        "re-record it with this version",
    )


def finished_shard(out: Path, index: int, config_hash: str, verify: bool = True) -> dict | None:
    """The sidecar of shard ``index`` when the shard is finished (folder and sidecar present, checksum matching),
    None when it still has to be recorded. A shard of another config or a corrupt one is an error: nothing is
    overwritten."""
    side, folder = sidecar_path(out, index), Path(out) / shard_name(index)
    if not side.is_file():
        return None
    info = _read_json(side, "shard sidecar")
    _check_version(info, side)
    require(
        info.get("config_hash") == config_hash,
        f"{folder} was recorded with another recipe (config hash {str(info.get('config_hash'))[:12]}, now "
        f"{config_hash[:12]}): choose another record.out or delete the folder",
    )
    require(folder.is_dir(), f"{folder} is missing but {side.name} says it was finished: delete {side} and rerun")
    if verify:
        _verify(folder, info, side)
    return info


def damaged_shard(out: Path, index: int, config_hash: str) -> bool:
    """Shard ``index`` has a sidecar of this recipe but its folder is missing or does not match its checksum."""
    side, folder = sidecar_path(out, index), Path(out) / shard_name(index)
    if not side.is_file() or _read_json(side, "shard sidecar").get("config_hash") != config_hash:
        return False
    return not folder.is_dir() or dir_checksum(folder) != _read_json(side, "shard sidecar").get("sha256")


def forget_shards(out: Path, indices: list[int]) -> None:
    """Remove shards (folder, then sidecar) so that a rerun records them again; the manifest goes with them."""
    for i in indices:
        shutil.rmtree(Path(out) / shard_name(i), ignore_errors=True)
        sidecar_path(out, i).unlink(missing_ok=True)
    if indices:
        (Path(out) / MANIFEST).unlink(missing_ok=True)


def _verify(folder: Path, info: dict, side: Path) -> None:
    require(
        dir_checksum(folder) == info.get("sha256"),
        f"{folder} is corrupt or truncated (its checksum does not match {side.name}): delete {folder.name} and "
        f"{folder.name}.json{' (and manifest.json)' if side.name == MANIFEST else ''}, then rerun `dparallel record` "
        "to record it again",
    )


def load_shard(folder: Path, info: dict | None = None, verify: bool = True, against: Path | None = None):
    """One shard as a ``datasets.Dataset`` (memory-mapped). With ``verify`` its checksum is checked against
    ``info["sha256"]`` (read from its sidecar when ``info`` is None; ``against`` names where it came from)."""
    from datasets import load_from_disk

    folder = Path(folder)
    side = against or folder.parent / f"{folder.name}.json"
    require(folder.is_dir(), f"{folder} is missing: the trajectory folder is incomplete")
    if info is None and side.is_file():
        info = _read_json(side, "shard sidecar")
    if verify and info is not None:
        _verify(folder, info, side)
    try:
        ds = load_from_disk(str(folder))
    except Exception as e:  # arrow errors on a truncated file, a foreign folder ...
        first = first_line(e)
        raise DParallelError(f"{folder} cannot be read as a trajectory shard ({first})") from None
    missing = [c for c in ("prompt_ids", "tokens", "order", "steps", "meta") if c not in ds.column_names]
    require(not missing, f"{folder} is not a trajectory shard: it has no column(s) {', '.join(missing)}")
    return ds


# ---- manifest and whole folders ---------------------------------------------------------------------------------


def write_manifest(out: Path, manifest: dict) -> Path:
    file = Path(out) / MANIFEST
    atomic_write_json(file, {"format": FORMAT, "schema_version": SCHEMA_VERSION, **manifest})
    return file


def read_manifest(path: str | Path) -> dict:
    """The manifest of a trajectory folder, checked for format and schema version."""
    folder = Path(path)
    require(folder.exists(), f"no trajectories at {folder}: run `dparallel record` first")
    file = folder if folder.is_file() else folder / MANIFEST
    require(
        file.is_file(),
        f"{folder} has no {MANIFEST}: the recording is unfinished, rerun `dparallel record` to resume it",
    )
    manifest = _read_json(file, "trajectory manifest")
    _check_version(manifest, file)
    return manifest


def load_trajectories(path: str | Path, verify: bool = True):
    """Every record of a trajectory folder as one ``datasets.Dataset`` (shards concatenated in manifest order)."""
    from datasets import concatenate_datasets

    folder = Path(path)
    manifest = read_manifest(folder)
    folder = folder.parent if folder.is_file() else folder
    shards = []
    for entry in manifest["shards"]:
        info = {"sha256": entry["sha256"]}
        shards.append(load_shard(folder / entry["name"], info, verify=verify, against=folder / MANIFEST))
    require(len(shards) > 0, f"{folder / MANIFEST} lists no shards")
    ds = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    total = manifest.get("counts", {}).get("records")
    require(total is None or total == len(ds), f"{folder / MANIFEST} counts {total} records, the shards hold {len(ds)}")
    return ds


def read_trajectories(path: str | Path, verify: bool = True) -> Iterator[dict[str, Any]]:
    """Iterate the records of a trajectory folder as dicts (lists for arrays, ``meta`` a dict)."""
    yield from load_trajectories(path, verify=verify)


def select_records(
    path: str | Path,
    keys: Sequence[str],
    hint: str,
    only_correct: bool = False,
    max_records: int | None = None,
    check: Callable[[dict], None] | None = None,
    arrays: bool = True,
) -> list[dict]:
    """The records of a trajectory folder that a method trains on: ``keys`` of each (numpy arrays when ``arrays``),
    those the teacher got wrong dropped when ``only_correct`` (``meta.correct``), at most ``max_records``, each
    passed to ``check`` first. ``hint`` is how to record the folder when it is missing."""
    require(Path(path).exists(), f"no trajectories at {path}: {hint}")
    records = []
    for r in read_trajectories(path):
        if only_correct and (r.get("meta") or {}).get("correct") is False:
            continue
        if check is not None:
            check(r)
        records.append({k: np.asarray(r[k]) if arrays else r.get(k) for k in keys})
        if max_records is not None and len(records) >= max_records:
            break
    require(len(records) > 0, f"no usable trajectories in {path} (all filtered out or none recorded)")
    return records


def balance_records(records: list[dict], groups: Sequence[str]) -> list[dict]:
    """Every group as large as the largest: group g's records repeat in order (``g[i % len(g)]``) up to the
    largest group's count, interleaved across groups (group order: first seen). ``groups[i]`` names record i's group.

    What a task with few distinct prompts needs beside thousands of another's: the suite's ``distinct`` has 20 train
    prompts, 0.3% of 6,774 records, and a student trained on them unbalanced forgets it (docs/methods/distill.md)."""
    require(len(records) == len(groups), f"{len(records)} records but {len(groups)} group names")
    by: dict[str, list[dict]] = {}
    for record, group in zip(records, groups):
        by.setdefault(group, []).append(record)
    most = max((len(v) for v in by.values()), default=0)
    return [v[i % len(v)] for i in range(most) for v in by.values()]


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split by record (never by step: a record's steps are strongly correlated)."""
    import torch

    require(0.0 <= val_fraction < 1.0, f"val_fraction={val_fraction} must be in [0, 1)")
    n_val = int(round(len(records) * val_fraction)) if len(records) > 1 else 0
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [records[i] for i in perm[n_val:]], [records[i] for i in perm[:n_val]]
