"""Stock transformers decoders made bidirectional by an explicit 4D mask, with the prefix/dual/static caches."""

from __future__ import annotations

import torch
from transformers import (
    DynamicCache,
    StaticCache,
)

from dparallel.adapters.base import (
    ModelAdapter,
    bidirectional_mask,
    cached_forward,
    layer_states,
    position_ids_from_mask,
)


class BidirectionalAdapter(ModelAdapter):
    """A stock transformers decoder (``LlamaForCausalLM``, ``Qwen2ForCausalLM``) made bidirectional by an explicit
    4D attention mask; ``prefill``/``extend`` give the prefix and dual caches over transformers' own cache."""

    cache_modes = ("none", "prefix", "dual")
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # A 4D mask is used as given by transformers' masking utils: this is what makes the decoder bidirectional.
        return self.model(
            input_ids=input_ids,
            attention_mask=bidirectional_mask(attention_mask),
            position_ids=position_ids_from_mask(attention_mask),
        ).logits

    @classmethod
    def stock_layer_class(cls, config) -> tuple[type, type, object]:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        layer = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
        layer._attn_implementation = "sdpa"
        return LlamaDecoderLayer, LlamaRotaryEmbedding, layer

    def prefill(self, x: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Full forward. Returns logits [B, L, V] (aligned as :meth:`logits`) and each layer's (keys, values)
        [B, H, L, D]."""
        out, cache = cached_forward(
            self.model, input_ids=x, attention_mask=bidirectional_mask(attn), position_ids=position_ids_from_mask(attn)
        )
        return self._align(out.logits), layer_states(cache)

    def extend(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, layers: list) -> torch.Tensor:
        """Forward ``ids`` [B, W] at ``positions`` against cached (keys, values) per layer; ``key_valid`` [B, Lc + W]
        marks the valid keys (cached context first, then the query). Returns logits [B, W, V] aligned as
        :meth:`logits` within the query (a shifted family's first row has no predecessor there: the cache passes
        one leading position more and drops that row)."""
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)  # a fresh cache per call: the query's own keys must not accumulate
        mask = key_valid.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        out, _ = cached_forward(self.model, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        return self._align(out.logits)

    # ---- the static path: fixed shapes over transformers' StaticCache (CUDA-graph ready) ---------------------
    def static_cache(self, batch: int, length: int) -> StaticCache:
        """A StaticCache with one slot per canvas position (``length``) for ``batch`` rows."""
        return StaticCache(config=self.model.config, max_cache_len=length)

    def prefill_static(self, x: torch.Tensor, attn: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """Full forward writing every position's keys/values into ``cache``. Returns aligned logits [B, L, V]."""
        return self._static_forward(x, position_ids_from_mask(attn), attn, cache, 0)

    def extend_static(
        self, ids: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor, cache: StaticCache, offset: int | None
    ) -> torch.Tensor:
        """Forward ``ids`` [B, W] (canvas positions ``offset``..) rewriting their own slots, attending over every
        slot (``attn`` [B, L]: the valid keys). ``offset`` None: the caller has set the write offsets (a CUDA graph
        replay must not bake one in). Returns aligned logits [B, W, V]."""
        return self._static_forward(ids, positions, attn, cache, offset)

    def _static_forward(self, ids, positions, attn, cache: StaticCache, offset: int | None) -> torch.Tensor:
        for layer in cache.layers if offset is not None else ():  # in place: the offset keeps its static address
            layer.cumulative_length.fill_(offset)
        mask = attn.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)  # [B, 1, W, L]: all valid keys
        out, _ = cached_forward(self.model, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
        return self._align(out.logits)
