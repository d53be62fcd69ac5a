"""The ``ar`` and ``block`` model families: a stock causal LM (Llama, Qwen2, ...) before and after conversion.

- ``ar``: any ``AutoModelForCausalLM`` read causally. Its logits are shifted back (``logits[:, i]`` predicts token
  i) so training code sees the same alignment as every family; it decodes greedily with transformers' own
  ``generate`` and KV cache (:class:`ARSampler`), one token per forward.
- ``block``: the converted model, the same stock class with block-causal attention (see ``ar2diff.masks``). Its
  settings live in the model's ``config.json`` under ``dparallel_block`` (``block_size``, ``context_causal``,
  ``token_shift``), so the folder alone says how to read it. The uncached forward runs the whole canvas; the
  engine's ``cache=block`` (:class:`dparallel.ar2diff.cache.BlockCache`) forwards only the active block.
"""

from __future__ import annotations

import time

import torch
from dparallel.ar2diff.masks import block_ids, decode_mask, noisy_blocks
from transformers import AutoModelForCausalLM, PreTrainedModel

from dparallel.adapters import ModelAdapter, SpecialIds, position_ids_from_mask, register_family
from dparallel.engine.sampler import DecodeConfig, DecodeStats
from dparallel.errors import require

MASK_TOKEN = "<|mask|>"  # added to a tokenizer that has no mask token (Qwen2.5 has spare embedding rows)
CAUSAL_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CausalFamily(ModelAdapter):
    """Shared loading of stock causal LMs; the logit at i-1 predicts token i."""

    shift_logits = True
    lora_targets = CAUSAL_LORA

    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)

    @classmethod
    def default_ids(cls, tokenizer) -> SpecialIds:
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else -1  # -1: an AR model has none
        return SpecialIds(mask=mask, eos=eos, eot=eos, pad=pad)


@register_family
class ARAdapter(CausalFamily):
    """A stock causal LM decoded autoregressively (the parent of a conversion, and its baseline)."""

    family = "ar"

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = position_ids_from_mask(attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits

    @property
    def sampler_class(self) -> type:
        return ARSampler


class ARSampler:
    """Greedy decoding through ``model.generate`` (transformers' KV cache). Same interface as the engine's
    ``Sampler``: the answer canvas [B, G] (EOS after the first EOS), the commit order and per-row stats; NFE is the
    row's answer length (one forward per token, the prompt's prefill included in the first)."""

    def __init__(self, adapter: ARAdapter, config: DecodeConfig, rule=None):
        config.validate()
        require(config.temperature == 0, "the ar family decodes greedily: set temperature=0")
        self.adapter, self.config = adapter, config

    @torch.no_grad()
    def run(self, prompts: list[list[int]], on_step=None) -> tuple[torch.Tensor, torch.Tensor, list[DecodeStats]]:
        require(on_step is None, "the ar family does not report per-step statistics: record with a diffusion model")
        ids, G = self.adapter.ids, self.config.gen_length
        width = max(len(p) for p in prompts)
        x = torch.tensor([[ids.pad] * (width - len(p)) + p for p in prompts], device=self.adapter.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=x.device)
        start = time.perf_counter()
        out = self.adapter.model.generate(
            input_ids=x,
            attention_mask=attn,
            max_new_tokens=G,
            do_sample=False,
            eos_token_id=sorted({ids.eos, ids.eot}),
            pad_token_id=ids.pad,
        )
        wall = time.perf_counter() - start
        canvas = torch.full((len(prompts), G), ids.eos, dtype=torch.long, device=x.device)
        new = out[:, width:]
        canvas[:, : new.shape[1]] = new
        ended = (canvas == ids.eos) | (canvas == ids.eot)
        after = ended.long().cumsum(1) - ended.long() > 0  # positions after the first EOS/EoT
        canvas = canvas.masked_fill(after, ids.eos)
        order = torch.arange(G, device=x.device)[None, :].expand(len(prompts), -1).clone()
        stats = []
        for row in canvas.tolist():
            n = self.adapter.answer_length(row)
            stats.append(DecodeStats(n, n, wall / len(prompts)))
        return canvas, order, stats


def block_settings(model: PreTrainedModel) -> dict:
    """The ``dparallel_block`` entry of the model config (block_size, context_causal, token_shift)."""
    settings = getattr(model.config, "dparallel_block", None)
    require(
        isinstance(settings, dict) and "block_size" in settings,
        "this model's config.json has no dparallel_block entry: convert it with the ar2diff method",
    )
    return settings


@register_family
class BlockAdapter(CausalFamily):
    """A converted block-diffusion model (stock causal-LM class, block-causal 4D mask)."""

    family = "block"

    def __init__(self, model: PreTrainedModel, tokenizer, ids: SpecialIds, name: str = "", revision: str = ""):
        super().__init__(model, tokenizer, ids, name, revision)
        require(ids.mask >= 0, f"{name or 'the model'} has no mask token: convert it with the ar2diff method")
        settings = block_settings(model)
        self.block_size = int(settings["block_size"])
        self.context_causal = bool(settings.get("context_causal", False))
        self.shift_logits = bool(settings.get("token_shift", True))

    @property
    def config_model(self) -> PreTrainedModel:
        """The underlying transformers model (through a peft wrapper)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward_span(
        self, x: torch.Tensor, attn: torch.Tensor, start: int, end: int, layers: list | None = None
    ) -> tuple[torch.Tensor, list]:
        """Forward canvas positions [start, end) against cached keys/values of [0, start) (``layers``; none when
        start = 0). x, attn: [B, >= end]. Returns the raw (unshifted) logits [B, end - start, V] and each layer's
        (keys, values) over [0, end)."""
        from transformers import DynamicCache

        blocks = block_ids(x.shape[1], self.block_size, x.device)[:end]
        noisy = noisy_blocks(x[:, :end], blocks, self.ids.mask)[:, start:]
        mask = decode_mask(blocks, attn[:, :end], noisy, start, self.context_causal)
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers or []):
            cache.update(k, v, i)  # a fresh cache per call: only finished blocks are ever kept
        out = self.model(
            input_ids=x[:, start:end],
            attention_mask=mask,
            position_ids=position_ids_from_mask(attn)[:, start:end],
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        blocks = block_ids(input_ids.shape[1], self.block_size, input_ids.device)
        noisy = noisy_blocks(input_ids, blocks, self.ids.mask)
        mask = decode_mask(blocks, attention_mask, noisy, 0, self.context_causal)
        positions = position_ids_from_mask(attention_mask)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
