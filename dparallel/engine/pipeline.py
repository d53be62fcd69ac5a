"""The public entry point: ``dparallel.load(path).generate(prompts, rule=..., ...)``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from dparallel.adapters.base import ModelAdapter
from dparallel.adapters.folder import read_manifest, resolve_path
from dparallel.adapters.load import load_adapter
from dparallel.core.errors import require
from dparallel.core.registry import DECODERS, resolve
from dparallel.core.runtime import pick_device
from dparallel.engine.config import DecodeConfig, DecodeStats
from dparallel.engine.rules import Rule

DECODE_KEYS = {f.name for f in dataclasses.fields(DecodeConfig)}


def is_component(manifest: dict) -> bool:
    """Whether a folder's manifest is a component that rides on a base (not a whole model: base or student)."""
    return manifest.get("component") not in (None, "base", "student")


@dataclass
class Generation:
    """One answer: its text, canvas tokens [G], the step each position was committed at, and the stats."""

    prompt: str
    text: str
    tokens: list[int]
    order: list[int]
    stats: DecodeStats


class Pipeline:
    """A model adapter plus decoding defaults; ``generate`` batches prompts through the engine."""

    def __init__(self, adapter: ModelAdapter, defaults: dict | None = None):
        self.adapter = adapter
        self.defaults = dict(defaults or {})
        # rules contributed by loaded components: name -> make(config, explicit decode kwargs) -> Rule
        self.rules: dict = {}
        self.components: dict[str, dict] = {}

    def with_component(self, folder: str) -> Pipeline:
        """A pipeline on this model with the component at ``folder`` attached (a filter, a joint layer, a policy),
        checked against this model: a component trained on one base decodes another base of the same family,
        vocabulary and mask id (a policy trained on one teacher, run on its fine-tuned successor). Its decoding
        defaults apply; this pipeline is left as it is."""
        from dparallel.engine.components import attach

        manifest = read_manifest(resolve_path(folder))
        require(
            is_component(manifest),
            f"{folder} is not a component (its dparallel.json has no component: filter, joint or policy)",
        )
        gen = Pipeline(self.adapter, {**self.defaults, **(manifest.get("decoding") or {})})
        attach(gen, resolve_path(folder), manifest)
        return gen

    def decode_config(self, **overrides) -> DecodeConfig:
        unknown = set(overrides) - DECODE_KEYS
        require(not unknown, f"unknown decoding option(s) {sorted(unknown)}: use {', '.join(sorted(DECODE_KEYS))}")
        return DecodeConfig(**{**self.defaults, **overrides})

    def generate(
        self,
        prompts: list[str] | str,
        *,
        chat_template: bool = False,
        batch_size: int = 32,
        lenient: bool = False,
        **decode,
    ) -> list[Generation]:
        """Decode each prompt; ``decode`` takes any :class:`DecodeConfig` field (rule, threshold, gen_length ...).
        A prompt character the tokenizer cannot represent is an error (``lenient``: a warning, and dropped)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.adapter.encode(prompts, chat_template, lenient)
        return self.generate_ids(prompts, ids, batch_size=batch_size, **decode)

    def generate_ids(
        self,
        prompts: list[str],
        ids: list[list[int]],
        *,
        batch_size: int = 32,
        rule_for_batch: Callable[[int, int], Rule] | None = None,
        **decode,
    ) -> list[Generation]:
        """Like :meth:`generate` for already-tokenised prompts. ``rule_for_batch(start, end)``, when given, builds
        the rule for prompts ``[start, end)`` (a rule that depends on the prompts, such as the oracle's replay)."""
        config = self.decode_config(**decode)
        make = self.rules.get(config.rule)
        decoder_class = resolve(DECODERS[self.adapter.decoder])  # the ar family decodes with generate()
        if rule_for_batch is None:
            decoder = decoder_class(self.adapter, config, rule=make(config, decode) if make else None)
        out = []
        for start in range(0, len(ids), batch_size):
            if rule_for_batch is not None:
                rule = rule_for_batch(start, min(start + batch_size, len(ids)))
                decoder = decoder_class(self.adapter, config, rule=rule)
            tokens, order, stats = decoder.run(ids[start : start + batch_size])
            for j, (row, row_order, st) in enumerate(zip(tokens.tolist(), order.tolist(), stats)):
                text = self.adapter.decode(row)
                out.append(Generation(prompts[start + j], text, row, row_order, st))
        return out


def load(
    path: str, *, family: str | None = None, device: str = "auto", dtype: str | None = None, revision: str | None = None
) -> Pipeline:
    """Load a model folder, ``builtin:NAME`` or Hub id as a ready :class:`Pipeline`.

    Decoding defaults come from the folder's ``dparallel.json`` (``decoding``) when it has them.
    """
    device = pick_device(device)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    manifest = read_manifest(resolve_path(path))
    if is_component(manifest):  # load its base, attach it
        from dparallel.engine.components import base_path

        folder = resolve_path(path)
        base = base_path(folder, manifest)
        adapter = load_adapter(
            base,
            family=family or read_manifest(resolve_path(base)).get("family") or manifest.get("family"),
            dtype=dtype,
            device=device,
            revision=(manifest.get("base_model") or {}).get("revision"),
        )
        return Pipeline(adapter).with_component(folder)
    adapter = load_adapter(path, family=family, dtype=dtype, device=device, revision=revision)
    return Pipeline(adapter, manifest.get("decoding"))
