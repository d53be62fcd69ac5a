"""LLaDA: its checkpoint in a stock Llama class (``llada``), or through its remote code (``llada-remote``)."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from dparallel.adapters.base import ModelAdapter, SpecialIds, one_layer_config
from dparallel.adapters.bidirectional import BidirectionalAdapter
from dparallel.adapters.stock import LLADA_KEY_MAPPING, llada_llama_config, raw_config


class LLaDAAdapter(BidirectionalAdapter):
    """GSAI-ML/LLaDA-8B-Instruct in a stock ``LlamaForCausalLM`` (its OLMo weight names mapped by
    :data:`~dparallel.stock.LLADA_KEY_MAPPING`), used bidirectionally: every cache mode works. Its linear layers
    therefore carry Llama's names (q/k/v/o_proj, gate/up/down_proj); ``llada-remote`` keeps LLaDA's own."""

    family = "llada"
    trust_remote_code = True  # the tokenizer only: the model is the stock class

    @classmethod
    def default_ids(cls, tokenizer) -> SpecialIds:
        return SpecialIds(mask=126336, eos=126081, eot=126348, pad=126081)

    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        raw = raw_config(path)
        if raw.get("model_type") != "llada":  # already in Llama form (e.g. exported by dparallel)
            return LlamaForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)
        config = llada_llama_config(raw)
        return LlamaForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, revision=revision, key_mapping=LLADA_KEY_MAPPING
        )


class LLaDARemoteAdapter(ModelAdapter):
    """LLaDA through its remote code (the fallback: ``model.family=llada-remote``). Its linear layers are named
    q/k/v_proj, attn_out, ff_proj, up_proj, ff_out (not o/gate/down_proj: a LoRA on those names would silently
    train nothing)."""

    family = "llada-remote"
    trust_remote_code = True
    lora_targets = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    default_ids = LLaDAAdapter.default_ids

    @classmethod
    def stock_layer_class(cls, config) -> tuple[type, type, object]:
        """LLaDA's block is a Llama block (RMSNorm, RoPE, SwiGLU) under OLMo names: a stock LlamaDecoderLayer
        with its shape (d_model, n_heads, n_kv_heads, mlp_hidden_size, rope_theta)."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        layer = one_layer_config(
            LlamaConfig,
            hidden_size=config.d_model,
            intermediate_size=config.mlp_hidden_size,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_kv_heads or config.n_heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_sequence_length,
            rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        )
        return LlamaDecoderLayer, LlamaRotaryEmbedding, layer
