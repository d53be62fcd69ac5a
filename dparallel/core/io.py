"""Atomic writes: a file or a folder is built under a temporary name in the same folder, then renamed over the
target, so a reader (or a resumed run) sees the old one or the whole new one, never a part."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a written file should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_recipe(cfg, run_dir: str | Path) -> Path:
    """Write the resolved recipe (an OmegaConf config) to RUN_DIR/config.yaml, atomically."""
    from omegaconf import OmegaConf

    out = Path(run_dir) / "config.yaml"
    atomic_write_text(out, OmegaConf.to_yaml(cfg))
    return out


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder of ``out``; when the block ends without error it replaces ``out``
    (an existing folder is removed first). On error ``out`` is left as it was and the temporary folder removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp creates 0700; a written folder should read like any other
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers (safetensors through transformers) create 0600 files
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
