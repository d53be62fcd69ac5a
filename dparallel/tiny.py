"""The embedded default model: a fresh tiny ``LlamaForCausalLM`` over the character tokenizer, and saving any
trained model as a Hugging Face folder with its tokenizer and ``dparallel.json``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from dparallel.adapters import MANIFEST, ModelAdapter, TinyAdapter
from dparallel.data.tokenizer import build_char_tokenizer
from dparallel.io import atomic_write_json


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


def save_model_folder(
    adapter: ModelAdapter,
    out: Path,
    dtype: str = "bfloat16",
    recipe: DictConfig | None = None,
    name: str | None = None,
    decoding: dict | None = None,
) -> None:
    """Save weights (safetensors, in ``dtype``), tokenizer and ``dparallel.json`` (with ``decoding`` defaults, if
    given) to ``out`` atomically: written to a temporary sibling folder, then renamed into place."""
    model = adapter.model
    if hasattr(model, "merge_and_unload"):  # a peft model: save the merged weights as a plain model
        model = model.merge_and_unload()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)
    try:
        state_dtype = getattr(torch, dtype)
        original = next(model.parameters()).dtype
        model.to(state_dtype).save_pretrained(tmp)
        model.to(original)
        adapter.tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / MANIFEST,
            {
                "component": "base",
                "family": adapter.family,
                "name": name or (recipe.name if recipe is not None else adapter.name),
                "ids": adapter.ids.__dict__,
                **({"decoding": decoding} if decoding else {}),
                "recipe": OmegaConf.to_container(recipe) if recipe is not None else None,
            },
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
