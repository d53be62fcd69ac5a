"""Model folders: ``builtin:NAME``, ``dparallel.json``, the Hub, and saving a trained model atomically."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dparallel.adapters.base import ModelAdapter
from dparallel.core.errors import DParallelError, first_line, require
from dparallel.core.io import atomic_dir, atomic_write_json

BUILTIN_PREFIX = "builtin:"
MANIFEST = "dparallel.json"
ADAPTER_DIR = "adapter"  # a LoRA run's peft adapter inside its model folder


def resolve_path(path: str) -> str:
    """``builtin:NAME`` -> the folder shipped inside the package; anything else is returned unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        assets = resources.files("dparallel") / "assets"
        folder = assets / path[len(BUILTIN_PREFIX) :]
        shipped = ", ".join(sorted(f"{BUILTIN_PREFIX}{d.name}" for d in assets.iterdir() if d.is_dir()))
        require(folder.is_dir(), f"no built-in model {path!r}: the shipped ones are {shipped}")
        return str(folder)
    return path


def read_manifest(path: str) -> dict:
    """The ``dparallel.json`` of a local folder, or {} when there is none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DParallelError(f"{file} is not valid JSON ({e.msg}): re-export the folder") from None


def download(repo_id: str, revision: str | None) -> str:
    """A Hub repo's files in the local cache (nothing is fetched when HF_HUB_OFFLINE=1 and it is cached)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision)
    except Exception as e:  # offline mode, no network, unknown repo, auth: one line, no traceback
        first = first_line(e)
        raise DParallelError(
            f"cannot get {repo_id!r} from the Hub ({first}): pass a local folder, or go online"
        ) from None


def save_model_folder(
    adapter: ModelAdapter,
    out: Path,
    dtype: str = "bfloat16",
    recipe: DictConfig | None = None,
    name: str | None = None,
    decoding: dict | None = None,
) -> None:
    """Save weights (safetensors, in ``dtype``), tokenizer and ``dparallel.json`` (with ``decoding`` defaults, if
    given) to ``out`` atomically: written to a temporary sibling folder, then renamed into place. A LoRA model is
    saved twice: its adapter in peft's own format under ``adapter/`` (``PeftModel.from_pretrained(base, ...)``; a
    few MB to push instead of the whole model), and merged into a plain model (what ``dparallel.load`` reads)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-shard bar is noise next to our own progress output
    model = adapter.model
    with atomic_dir(out) as tmp:
        if hasattr(model, "merge_and_unload"):  # a peft model
            model.save_pretrained(tmp / ADAPTER_DIR)
            model = model.merge_and_unload()
        state_dtype = getattr(torch, dtype)
        original = next(model.parameters()).dtype
        model.to(state_dtype).save_pretrained(tmp)
        model.to(original)
        adapter.tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / MANIFEST,
            {
                "component": "base",
                "family": adapter.family,
                "name": name or (recipe.name if recipe is not None else adapter.name),
                "ids": adapter.ids.__dict__,
                "vocab_size": adapter.vocab_size,
                **({"decoding": decoding} if decoding else {}),
                "recipe": OmegaConf.to_container(recipe) if recipe is not None else None,
            },
        )
