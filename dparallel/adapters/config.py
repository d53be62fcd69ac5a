"""Recipe sections of the adapters layer: which model to load, and the shape of a fresh tiny one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    path: str = "builtin:tiny-teacher"
    """a local folder, builtin:NAME (shipped with the package) or a Hub id"""
    family: str | None = None
    """tiny | llada | dream | hf-mlm; default: the folder's dparallel.json"""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin"""
    dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16"""
    device: str = "auto"
    """auto (cuda when available) | cpu | cuda | cuda:N"""


@dataclass
class TinyModelConfig:
    """Shape of a fresh tiny model (a stock LlamaConfig) when training one from scratch."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
