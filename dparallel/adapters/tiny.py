"""The embedded default family: a stock ``LlamaForCausalLM`` over the character tokenizer, used bidirectionally."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from dparallel.adapters.bidirectional import BidirectionalAdapter
from dparallel.adapters.char_tokenizer import build_char_tokenizer


class TinyAdapter(BidirectionalAdapter):
    """The embedded default: a stock ``LlamaForCausalLM`` used bidirectionally."""

    family = "tiny"

    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)


def new_tiny_adapter(shape: DictConfig, seed: int = 0) -> TinyAdapter:
    """A randomly initialised tiny model (stock Llama architecture, used bidirectionally) with the char tokenizer."""
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return TinyAdapter(model, tokenizer, TinyAdapter.default_ids(tokenizer), name="tiny")
