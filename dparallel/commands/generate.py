"""``dparallel generate [RECIPE|MODEL] --prompt ...``: decode prompts with the recipe's decode section."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from dparallel.core.errors import require
from dparallel.core.runtime import weights_dtype
from dparallel.engine.config import DecodeConfig
from dparallel.engine.pipeline import load


def frames(generation, adapter) -> list[tuple[str, str]]:
    """The canvas of one answer before each step and at the end, as (plain text, rich markup): a masked position
    is ``·``, EOS ``∅``, a newline ``⏎``; the tokens the step commits are bold green in the markup. Built from the
    answer's commit order (position i is committed at step order[i]), so it shows exactly what the decoder did."""
    from rich.markup import escape

    def text(token: int) -> str:
        if token in (adapter.ids.eos, adapter.ids.eot):
            return "∅"
        return adapter.tokenizer.decode([token]).replace("\n", "⏎") or "?"

    pieces = [text(t) for t in generation.tokens]
    steps = max(generation.order) + 1
    out = []
    for s in range(steps + 1):
        plain = "".join(p if o < s else "·" for p, o in zip(pieces, generation.order))
        markup = "".join(
            f"[bold green]{escape(p)}[/]" if o == s - 1 else escape(p) if o < s else "[dim]·[/]"
            for p, o in zip(pieces, generation.order)
        )
        out.append((plain, markup))
    return out


def show(generation, adapter) -> None:
    """Print the decode of one answer step by step (``dparallel generate --show``)."""
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]{generation.prompt.strip()}[/]")
    for s, (_, markup) in enumerate(frames(generation, adapter)):
        committed = sum(o == s - 1 for o in generation.order)
        console.print(f"step {s:>3} +{committed:<3} {markup}")


def generate(
    cfg: DictConfig, prompts: list[str], as_json: bool = False, lenient: bool = False, show_steps: bool = False
) -> list:
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
        if show_steps:
            show(o, gen.adapter)
        if as_json:
            print(json.dumps({"prompt": o.prompt, "text": o.text, "stats": o.stats.to_dict()}))
        else:
            print(f"{o.text}\n  [NFE {o.stats.nfe}, TPF {o.stats.tpf:.2f}, {o.stats.tokens_per_s:.0f} tok/s]")
    return outs
