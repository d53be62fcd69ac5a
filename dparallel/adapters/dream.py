"""Dream: its checkpoint in a stock Qwen2 class (``dream``), or through its remote code (``dream-remote``)."""

from __future__ import annotations

import torch
from transformers import (
    PreTrainedModel,
    Qwen2ForCausalLM,
)

from dparallel.adapters.base import (
    ModelAdapter,
    SpecialIds,
    bidirectional_mask,
    one_layer_config,
    position_ids_from_mask,
)
from dparallel.adapters.bidirectional import BidirectionalAdapter
from dparallel.adapters.stock import dream_qwen2_config, raw_config


class DreamAdapter(BidirectionalAdapter):
    """Dream-org/Dream-v0-Instruct-7B in a stock ``Qwen2ForCausalLM`` (its weight names are Qwen2's), used
    bidirectionally. Logits are shifted: position i-1 predicts i (under a cache the query starts one position
    before the window, see :class:`~dparallel.engine.cache.ContextCache`)."""

    family = "dream"
    shift_logits = True
    trust_remote_code = True  # the tokenizer only: the model is the stock class

    @classmethod
    def default_ids(cls, tokenizer) -> SpecialIds:
        return SpecialIds(mask=151666, eos=151643, eot=151645, pad=151643)

    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        raw = raw_config(path)
        config = dream_qwen2_config(raw) if raw.get("model_type") != "qwen2" else None
        return Qwen2ForCausalLM.from_pretrained(path, config=config, dtype=dtype, revision=revision)

    @classmethod
    def stock_layer_class(cls, config) -> tuple[type, type, object]:
        """Dream's body is Qwen2's: a stock Qwen2DecoderLayer with its shape, used bidirectionally."""
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

        return Qwen2DecoderLayer, Qwen2RotaryEmbedding, _qwen2_layer_config(config)


def _qwen2_layer_config(config):
    from transformers import Qwen2Config

    return one_layer_config(
        Qwen2Config,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(_rope_theta(config))},
    )


def _rope_theta(config) -> float:
    """RoPE's base: transformers 5 configs keep it in ``rope_parameters``, remote-code configs as ``rope_theta``."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 1e6)


class DreamRemoteAdapter(ModelAdapter):
    """Dream through its remote code (the fallback: ``model.family=dream-remote``)."""

    family = "dream-remote"
    trust_remote_code = True
    shift_logits = True
    lora_targets = BidirectionalAdapter.lora_targets
    default_ids = DreamAdapter.default_ids
    stock_layer_class = DreamAdapter.stock_layer_class

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None or bool(attention_mask.all()):
            return self.model(input_ids, "full").logits
        # Dream's remote code takes a 4D boolean mask and explicit positions (its generation utils do the same).
        return self.model(input_ids, bidirectional_mask(attention_mask), position_ids_from_mask(attention_mask)).logits
