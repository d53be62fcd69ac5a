"""Checkpoints that a resume can trust.

Lightning writes every checkpoint through a ``CheckpointIO`` plugin; ours (:class:`VerifiedCheckpointIO`) writes
``last.ckpt`` in its own folder under a temporary name, fsyncs it, records its SHA-256 and global step in
``last.ckpt.json``, and only then renames it into place. The checkpoint it replaces, when it holds an earlier
step, is kept as ``previous.ckpt`` (with its sidecar) until the new one is in place. So at any instant of a kill
or a full disk, the folder holds at least one checkpoint whose bytes match its recorded digest.

:func:`resume_point` picks the newest intact one: a ``last.ckpt`` whose bytes do not match its digest (or that
does not load, for a folder written before sidecars existed) falls back to ``previous.ckpt`` with one line saying
so; with none intact it refuses in one line rather than training from garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dparallel.core.errors import DParallelError
from dparallel.core.io import atomic_write_json

LAST, PREVIOUS = "last.ckpt", "previous.ckpt"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def intact_step(path: Path) -> int | None:
    """The global step of an intact checkpoint: its bytes match its sidecar's digest (or, without a sidecar, it
    loads); None when it is missing or damaged."""
    if not path.is_file():
        return None
    side = sidecar(path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError:
            return None
        return int(meta["global_step"]) if file_digest(path) == meta.get("sha256") else None
    try:  # a checkpoint written before sidecars: trust it only if it loads
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:
        return None


class VerifiedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with an atomic, verified write in the target folder and one previous good file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            meta = {"sha256": file_digest(tmp), "global_step": int(checkpoint.get("global_step", 0))}
            held = intact_step(path) if path.name == LAST else None
            if held is not None and held != meta["global_step"]:  # keep the earlier good one until this lands
                os.replace(path, path.with_name(PREVIOUS))
                os.replace(sidecar(path), sidecar(path.with_name(PREVIOUS)))
            os.replace(tmp, path)
            atomic_write_json(sidecar(path), meta)
        finally:
            tmp.unlink(missing_ok=True)


def resume_point(run_dir: Path) -> tuple[str | None, int]:
    """(the newest intact checkpoint of RUN_DIR/checkpoints, its global step), or (None, 0) for a fresh run."""
    folder = run_dir / "checkpoints"
    last, previous = folder / LAST, folder / PREVIOUS
    if not last.exists() and not previous.exists():
        return None, 0
    step = intact_step(last)
    if step is not None:
        return str(last), step
    step = intact_step(previous)
    if step is None:
        raise DParallelError(
            f"no intact checkpoint in {folder} (last.ckpt and previous.ckpt are damaged or missing): "
            f"delete {folder} to start over"
        )
    if last.exists():
        print(f"{last} is damaged (its bytes do not match its checksum): resuming from {previous} (step {step})")
    return str(previous), step
