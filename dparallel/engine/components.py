"""Components: small learned parts that ride on a frozen base model (a Learn2PD filter, a joint-sampler layer, an
unmasking policy). One folder per component: its weights (``<kind>.safetensors``) and ``dparallel.json`` naming
the component kind, the base model (path, revision, family, vocabulary size, ids), the component's own shape and
the decoding defaults. ``dparallel.load(folder)`` loads the base, refuses a base that does not match, and calls the
kind's ``attach`` to give the generator the component's decoding rule.

A method that produces a component registers ``attach`` on its :class:`~dparallel.methods.Method` entry; this module
holds the shared save/load/check code so each component only describes its own tensors and shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dparallel.adapters.base import ModelAdapter, SpecialIds
from dparallel.adapters.folder import MANIFEST, read_manifest, resolve_path
from dparallel.core.errors import DParallelError, first_line, require
from dparallel.core.io import atomic_dir, atomic_write_json


def weights_file(kind: str) -> str:
    return f"{kind}.safetensors"


class HeadOnlyAdapter:
    """Stands in for the base model while training a head on precomputed features: ids and identity, no weights."""

    def __init__(self, family: str, ids: SpecialIds, vocab_size: int, name: str = ""):
        self.family, self.ids, self.vocab_size, self.name = family, ids, vocab_size, name
        self.model = None


def base_vocab_size(path: str, revision: str | None) -> int:
    """A base model's vocabulary size from its config.json (no weights are loaded)."""
    local = resolve_path(path)
    if Path(local).is_dir():
        file = Path(local) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(local, "config.json", revision=revision))
        except Exception as e:  # offline, unknown repo: one line
            first = first_line(e)
            raise DParallelError(f"cannot read the config of base model {path!r} ({first})") from None
    require(file.is_file(), f"{file} not found: model.path must be a model folder")
    vocab = json.loads(file.read_text()).get("vocab_size")
    require(isinstance(vocab, int), f"{file} has no vocab_size")
    return vocab


def save_component(
    out: str | Path,
    kind: str,
    module: torch.nn.Module,
    base: ModelAdapter | HeadOnlyAdapter,
    cfg: DictConfig,
    fields: dict,
    decoding: dict,
) -> None:
    """Write a component folder atomically (temp sibling folder, renamed into place): ``module``'s weights as
    ``<kind>.safetensors`` (float32) and ``dparallel.json`` with the base model's identity, ``fields`` (the
    component's shape and metrics) and ``decoding`` (the defaults ``dparallel.load`` applies)."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / weights_file(kind)))
        atomic_write_json(
            tmp / MANIFEST,
            {
                "component": kind,
                "family": base.family,
                "name": cfg.name,
                "base_model": {"path": cfg.model.path, "revision": cfg.model.revision},
                "ids": dict(base.ids.__dict__),
                "vocab_size": base.vocab_size,
                **fields,
                "decoding": decoding,
                "recipe": OmegaConf.to_container(cfg),
            },
        )


def load_weights(folder: str | Path, kind: str, module: torch.nn.Module, manifest: dict) -> torch.nn.Module:
    """Load ``<kind>.safetensors`` of a component folder into ``module`` (built from the manifest's shape)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    require(manifest.get("component") == kind, f"{folder} is not a {kind} component (dparallel.json)")
    file = folder / weights_file(kind)
    require(file.is_file(), f"{file} is missing: re-export the {kind} component")
    try:
        module.load_state_dict(load_file(str(file)))
    except (RuntimeError, SafetensorError) as e:
        raise DParallelError(f"{file} does not match its dparallel.json ({first_line(e)})") from None
    return module.eval()


def check_base(adapter: ModelAdapter, manifest: dict, where: str) -> None:
    """Refuse a base model whose family, vocabulary size or mask id differ from the one the component was trained
    on: its features (confidences, hidden states, token ids) would mean something else."""
    want = (manifest.get("family"), manifest.get("vocab_size"), (manifest.get("ids") or {}).get("mask"))
    have = (adapter.family, adapter.vocab_size, adapter.ids.mask)
    for name, w, h in zip(("family", "vocab size", "mask id"), want, have):
        require(
            w is None or w == h,
            f"{where} was trained for a base with {name} {w!r}, the base model has {h!r}: load it onto its own base "
            f"({(manifest.get('base_model') or {}).get('path')})",
        )


def base_path(folder: str, manifest: dict) -> str:
    """The base model a component names, resolved next to the folder when it was stored inside it."""
    base = manifest.get("base_model") or {}
    path = str(base.get("path") or "")
    require(path, f"{folder}/dparallel.json names no base_model.path")
    if not Path(path).exists() and (Path(folder) / path).exists():
        path = str(Path(folder) / path)
    return path


def attach(generator, folder: str | Path, manifest: dict | None = None) -> None:
    """Attach the component at ``folder`` to ``generator`` (whose base it is checked against)."""
    from dparallel.core.registry import component_attach

    folder = resolve_path(str(folder))
    manifest = manifest if manifest is not None else read_manifest(folder)
    kind = manifest.get("component")
    check_base(generator.adapter, manifest, str(folder))
    component_attach(kind)(generator, folder, manifest)
    generator.components[kind] = {"folder": str(folder)}
