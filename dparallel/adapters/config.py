"""Recipe sections of the adapters layer: which model to load, and the shape of a fresh tiny one."""

from __future__ import annotations

from dataclasses import dataclass

from dparallel.core.fields import ranged


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

    hidden_size: int = ranged(256, 1)
    intermediate_size: int = ranged(512, 1)
    num_hidden_layers: int = ranged(6, 1)
    num_attention_heads: int = ranged(4, 1)
    max_position_embeddings: int = ranged(1024, 1)
    rope_theta: float = ranged(10000.0, 0, above=True)
