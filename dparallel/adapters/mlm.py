"""Any Hugging Face masked LM (``hf-mlm``)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForMaskedLM,
    PreTrainedModel,
)

from dparallel.adapters.base import ModelAdapter


class MaskedLMAdapter(ModelAdapter):
    """Any Hugging Face masked LM (BERT, RoBERTa, ModernBERT ...): the mask id comes from its tokenizer."""

    family = "hf-mlm"
    lora_targets = ("query", "key", "value", "dense")

    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        return AutoModelForMaskedLM.from_pretrained(path, dtype=dtype, revision=revision)
