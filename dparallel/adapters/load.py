"""Loading any model folder or Hub id through its family's adapter."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging

from dparallel.adapters.base import ModelAdapter, SpecialIds
from dparallel.adapters.folder import download, read_manifest, resolve_path
from dparallel.core.errors import DParallelError, first_line, require
from dparallel.core.paths import recipe_writing
from dparallel.core.registry import FAMILIES, adapter_class


def missing_folder(path: str) -> str | None:
    """One line for a local model folder that does not exist (the shipped recipe that writes it, when one does), or
    None when ``path`` may be a Hub id (``name`` or ``org/name`` that no shipped recipe writes)."""
    writer = recipe_writing(path)
    if writer is None and not path.startswith((".", "/", "~")) and path.count("/") <= 1:
        return None
    make = f"`dparallel train {writer}` writes it, or " if writer else ""
    return f"model folder {path} does not exist: {make}set model.path to a trained folder (or builtin:NAME)"


def load_adapter(
    path: str,
    family: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
) -> ModelAdapter:
    """Load model + tokenizer at ``path`` (a local folder, ``builtin:NAME`` or a Hub id) through its family.

    The family comes from the argument, else from the folder's ``dparallel.json``. Nothing is downloaded when
    ``path`` is local; a Hub id downloads the weights (HF_HUB_OFFLINE=1 turns that into a clear error).
    """
    local = resolve_path(path)
    if not Path(local).is_dir():
        missing = missing_folder(local)
        require(missing is None, missing or "")
        local = download(local, revision)
    manifest = read_manifest(local)
    family = family or manifest.get("family")
    require(family is not None, f"cannot tell the model family of {path!r}: set model.family ({', '.join(FAMILIES)})")
    cls = adapter_class(family)
    torch_dtype = getattr(torch, dtype)
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise next to our own progress output
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, revision=revision, trust_remote_code=cls.trust_remote_code)
        model = cls.load_model(local, torch_dtype, revision)
    except OSError as e:
        first = first_line(e)
        raise DParallelError(f"cannot load model {path!r}: {first}") from None
    except (SafetensorError, ValueError, RuntimeError) as e:  # truncated or corrupt weights, mismatched shapes
        raise DParallelError(
            f"cannot read the weights of {path!r} ({first_line(e)}): re-download or re-export it"
        ) from None
    model = model.to(device).eval()
    ids = cls.default_ids(tokenizer)
    overrides = manifest.get("ids", {})
    if overrides:
        ids = SpecialIds(**{**ids.__dict__, **overrides})
    return cls(model, tokenizer, ids, name=manifest.get("name", path), revision=revision or "")
