"""The ``ar`` and ``block`` model families: a stock causal LM (Llama, Qwen2, ...) before and after conversion.

- ``ar``: any ``AutoModelForCausalLM`` read causally. Its logits are shifted back (``logits[:, i]`` predicts token
  i) so training code sees the same alignment as every family; it decodes greedily with transformers' own
  ``generate`` and KV cache (:class:`ARDecoder`), one token per forward.
- ``block``: the converted model, the same stock class with block-causal attention (see ``ar2diff.masks``). Its
  settings live in the model's ``config.json`` under ``dparallel_block`` (``block_size``, ``context_causal``,
  ``token_shift``), so the folder alone says how to read it. The uncached forward runs the whole canvas; the
  engine's ``cache=block`` (:class:`dparallel.ar2diff.cache.BlockCache`) forwards only the active block.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dparallel.adapters.base import ModelAdapter, SpecialIds, cached_forward, layer_states, position_ids_from_mask
from dparallel.ar2diff.masks import block_ids, decode_mask, noisy_blocks
from dparallel.core.errors import require

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


class ARAdapter(CausalFamily):
    """A stock causal LM decoded autoregressively (the parent of a conversion, and its baseline)."""

    family = "ar"
    decoder = "ar"  # decoded by dparallel.ar2diff.decoding.ARDecoder (transformers' generate + KV cache)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = position_ids_from_mask(attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits


def block_settings(model: PreTrainedModel) -> dict:
    """The ``dparallel_block`` entry of the model config (block_size, context_causal, token_shift)."""
    settings = getattr(model.config, "dparallel_block", None)
    require(
        isinstance(settings, dict) and "block_size" in settings,
        "this model's config.json has no dparallel_block entry: convert it with the ar2diff method",
    )
    return settings


class BlockAdapter(CausalFamily):
    """A converted block-diffusion model (stock causal-LM class, block-causal 4D mask)."""

    family = "block"
    cache_modes = ("none", "block")  # block: the exact block-wise KV cache (dparallel.ar2diff.cache)

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
        out, cache = cached_forward(
            self.model,
            cache,
            input_ids=x[:, start:end],
            attention_mask=mask,
            position_ids=position_ids_from_mask(attn)[:, start:end],
        )
        return out.logits, layer_states(cache)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        blocks = block_ids(input_ids.shape[1], self.block_size, input_ids.device)
        noisy = noisy_blocks(input_ids, blocks, self.ids.mask)
        mask = decode_mask(blocks, attention_mask, noisy, 0, self.context_causal)
        positions = position_ids_from_mask(attention_mask)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
