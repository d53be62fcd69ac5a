"""``dparallel generate [RECIPE|MODEL] --prompt ...``: decode prompts with the recipe's decode section."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from dparallel.core.errors import require
from dparallel.core.runtime import weights_dtype
from dparallel.engine.config import DecodeConfig
from dparallel.engine.pipeline import load


def generate(cfg: DictConfig, prompts: list[str], as_json: bool = False, lenient: bool = False) -> list:
    """Decode prompts with the recipe's decode section; print text (or JSON lines with stats). Options left at
    their defaults do not override the model folder's own decoding defaults (its dparallel.json ``decoding``)."""
    require(len(prompts) > 0, "no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    DecodeConfig(**OmegaConf.to_container(cfg.decode)).validate()  # fail before loading any weights
    gen = load(
        cfg.model.path,
        family=cfg.model.family,
        device=cfg.model.device,
        dtype=weights_dtype(cfg.model.dtype, cfg.model.device),
        revision=cfg.model.revision,
    )
    default = DecodeConfig()
    decode = {k: v for k, v in OmegaConf.to_container(cfg.decode).items() if v != getattr(default, k)}
    outs = gen.generate(prompts, lenient=lenient, **decode)
    for o in outs:
        if as_json:
            print(json.dumps({"prompt": o.prompt, "text": o.text, "stats": o.stats.to_dict()}))
        else:
            print(f"{o.text}\n  [NFE {o.stats.nfe}, TPF {o.stats.tpf:.2f}, {o.stats.tokens_per_s:.0f} tok/s]")
    return outs
