"""LLaDA and Dream checkpoints in stock transformers classes: the config translation and the weight-name maps.

LLaDA-8B is a Llama decoder (RMSNorm, RoPE, SwiGLU, no biases) under OLMo names, used bidirectionally; Dream-7B is
Qwen2 (biases on q/k/v) with shifted logits. Loaded into ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (through
``from_pretrained(key_mapping=...)``, no remote code), they run bidirectionally through the same explicit 4D mask
as the tiny family, so every cache, SDPA/FlashAttention path and ``StaticCache`` that the stock classes have works
for them. The remote code stays available as the ``llada-remote`` / ``dream-remote`` families.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlamaConfig, Qwen2Config

from dparallel.core.errors import require

# LLaDA (OLMo names) -> Llama. LLaDA's SwiGLU is ff_out(act(ff_proj(x)) * up_proj(x)): ff_proj is Llama's gate.
LLADA_KEY_MAPPING: dict[str, str] = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
}


def raw_config(path: str) -> dict:
    """The folder's config.json as a dict."""
    file = Path(path) / "config.json"
    require(file.is_file(), f"{file} not found: pass a model folder with its config.json")
    return json.loads(file.read_text())


def llada_llama_config(raw: dict) -> LlamaConfig:
    """The LlamaConfig of a LLaDA config.json (model_type ``llada``). Features the stock class lacks (ALiBi,
    biases, q/k norms, tied or scaled logits, input-embedding norm) are refused in one line."""
    unsupported = [
        key
        for key, bad in (
            ("alibi", raw.get("alibi")),
            ("include_bias", raw.get("include_bias")),
            ("include_qkv_bias", raw.get("include_qkv_bias")),
            ("attention_layer_norm", raw.get("attention_layer_norm")),
            ("weight_tying", raw.get("weight_tying")),
            ("scale_logits", raw.get("scale_logits")),
            ("input_emb_norm", raw.get("input_emb_norm")),
            ("rope", not raw.get("rope", True)),
            ("block_type", raw.get("block_type", "llama") != "llama"),
            ("layer_norm_type", raw.get("layer_norm_type", "rms") != "rms"),
            ("activation_type", raw.get("activation_type", "silu") != "silu"),
        )
        if bad
    ]
    require(
        not unsupported,
        f"this LLaDA config sets {', '.join(unsupported)}, which the stock Llama class does not have: "
        "load it with model.family=llada-remote",
    )
    heads = raw["n_heads"]
    return LlamaConfig(
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        hidden_size=raw["d_model"],
        intermediate_size=raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * raw["d_model"],
        num_hidden_layers=raw["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("n_kv_heads") or heads,
        max_position_embeddings=raw.get("max_sequence_length", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_parameters={"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))},
        tie_word_embeddings=False,
        pad_token_id=None,  # LLaDA's embedding has no padding_idx (its pad is EOS): keep the pad row trainable
        eos_token_id=raw.get("eos_token_id"),
        attn_implementation="sdpa",
    )


def dream_qwen2_config(raw: dict) -> Qwen2Config:
    """The Qwen2Config of a Dream config.json (model_type ``Dream``: Qwen2's fields under Dream's name)."""
    fields = Qwen2Config().to_dict().keys()
    kept = {k: v for k, v in raw.items() if k in fields and k not in ("model_type", "architectures", "auto_map")}
    require(not raw.get("rope_scaling"), "this Dream config scales RoPE: load it with model.family=dream-remote")
    rope = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))}
    config = Qwen2Config(**{**kept, "rope_parameters": rope, "use_sliding_window": False})
    config._attn_implementation = "sdpa"
    return config
