"""The adapter contract: one aligned, bidirectional forward per family, and what each family supports."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import (
    AutoModel,
    PreTrainedModel,
)

from dparallel.core.errors import DParallelError, require


@dataclass(frozen=True)
class SpecialIds:
    """Token ids a decoder needs. ``eot`` ends a turn (LLaDA's <|eot_id|>); ``eos`` fills the rest of the canvas."""

    mask: int
    eos: int
    eot: int
    pad: int


class ModelAdapter:
    """Base adapter. Subclasses set the class constants and, where needed, override ``_forward``."""

    family: ClassVar[str] = ""
    shift_logits: ClassVar[bool] = False  # True where the model predicts position i from i-1 (Dream, AR)
    lora_targets: ClassVar[tuple[str, ...]] = ()
    trust_remote_code: ClassVar[bool] = False
    # What the family supports, read by the engine instead of testing family names:
    cache_modes: ClassVar[tuple[str, ...]] = ("none",)  # engine cache modes; prefix/dual need prefill/extend
    decoder: ClassVar[str] = "diffusion"  # the decoding loop (registry.DECODERS): diffusion | ar

    def __init__(self, model: PreTrainedModel, tokenizer, ids: SpecialIds, name: str = "", revision: str = ""):
        require(
            ids.mask != ids.pad,
            f"mask id {ids.mask} equals the pad id: give the tokenizer a distinct pad token (or set ids.pad in the "
            "folder's dparallel.json)",
        )
        self.model, self.tokenizer, self.ids = model, tokenizer, ids
        self.name, self.revision = name, revision

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        return AutoModel.from_pretrained(path, dtype=dtype, revision=revision, trust_remote_code=cls.trust_remote_code)

    @classmethod
    def default_ids(cls, tokenizer) -> SpecialIds:
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return SpecialIds(mask=tokenizer.mask_token_id, eos=eos, eot=eos, pad=pad)

    # ---- forward -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, L]; attention_mask: [B, L] (1 = real token) or None. Returns float logits [B, L, V]."""
        return self._align(self._forward(input_ids, attention_mask))

    def _align(self, logits: torch.Tensor) -> torch.Tensor:
        """Undo the family's shift: the model's logit at i-1 predicts token i; position 0 has no predecessor and
        reuses its own."""
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if self.shift_logits else logits

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    # ---- hidden states (for heads/sampler layers over the frozen base) ---------------------------------------
    def output_head(self) -> torch.nn.Module:
        """The frozen LM head: the module that maps the last hidden states [B, L, H] to the logits [B, L, V].
        What it receives is already through the final norm (Llama/Qwen2/LLaDA apply it before the head), so
        ``output_head()(hidden) == logits`` exactly for the hidden states :meth:`capture_hidden` records."""
        head = self.model.get_output_embeddings()
        require(
            isinstance(head, torch.nn.Linear),
            f"the {self.family} model has no separate linear LM head (tied embeddings?): hidden-state components "
            "need one",
        )
        return head

    def input_embeddings(self) -> torch.nn.Module:
        """The frozen token embedding: ids [B, L] -> [B, L, H]."""
        return self.model.get_input_embeddings()

    @contextmanager
    def capture_hidden(self) -> Iterator[HiddenCapture]:
        """Within the block, every forward (``logits``, ``prefill``, ``extend``) records the input of the LM head,
        i.e. the last hidden states [B, S, H] of the positions whose logits it returns, aligned like those logits
        (Dream's shift undone). Costs one forward hook; nothing is recomputed."""
        capture = HiddenCapture(self.shift_logits)
        handle = self.output_head().register_forward_hook(capture.hook)
        try:
            yield capture
        finally:
            handle.remove()

    def logits_and_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`logits` [B, L, V] and the last hidden states [B, L, H] with ``output_head()(hidden) == logits``."""
        with self.capture_hidden() as capture:
            logits = self.logits(input_ids, attention_mask)
        return logits, capture.hidden

    @classmethod
    def stock_layer_class(cls, config) -> tuple[type, type, object]:
        """(decoder layer class, rotary embedding class, layer config) of the family's stock transformers layer with
        the base's shape (one layer), for components that add a layer over the base's hidden states."""
        raise DParallelError(f"the {cls.family} family has no sampler layer class: use tiny, llada or dream")

    # ---- text ----------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str], chat_template: bool = False, lenient: bool = False) -> list[list[int]]:
        """Token ids of each prompt, through the tokenizer's chat template when asked. A character the tokenizer
        cannot represent (dropped, or read as its unknown token) is an error naming it; ``lenient`` makes it a
        warning."""
        for p in prompts:
            self._check_vocabulary(p, lenient)
        if chat_template:
            require(
                getattr(self.tokenizer, "chat_template", None) is not None,
                f"the tokenizer of {self.name!r} has no chat template: set record.source.chat_template=false",
            )
            return [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
                for p in prompts
            ]
        return [self.tokenizer(p).input_ids for p in prompts]

    def _check_vocabulary(self, prompt: str, lenient: bool) -> None:
        """Characters of ``prompt`` that do not come back from encode -> decode: dropped by the tokenizer, or read as
        its (special, so skipped) unknown token. Whitespace is left to the tokenizer's normalisation."""
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        back = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        lost = Counter(c for c in prompt if not c.isspace()) - Counter(back)
        bad = sorted(lost)
        if not bad:
            return
        message = f"the tokenizer of {self.name!r} cannot represent {''.join(bad)!r} in the prompt {prompt[:40]!r}"
        if lenient:
            warnings.warn(f"{message}: dropped (--lenient)", stacklevel=3)
            return
        raise DParallelError(f"{message}: remove those characters, or pass --lenient to drop them with a warning")

    @property
    def max_positions(self) -> int | None:
        """The longest prompt + canvas the model's position embeddings cover (None: not bounded by its config)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def answer_length(self, tokens: list[int]) -> int:
        """Answer tokens up to and including the first EOS/EoT (the whole canvas if there is none)."""
        for i, t in enumerate(tokens):
            if t in (self.ids.eos, self.ids.eot):
                return i + 1
        return len(tokens)

    def decode(self, tokens: list[int]) -> str:
        """The answer text: tokens before the first EOS/EoT, special tokens dropped."""
        n = self.answer_length(tokens)
        if n and tokens[n - 1] in (self.ids.eos, self.ids.eot):
            n -= 1
        return self.tokenizer.decode(tokens[:n], skip_special_tokens=True)


class HiddenCapture:
    """What :meth:`ModelAdapter.capture_hidden` records: the LM head's input of the latest forward."""

    def __init__(self, shift: bool):
        self.shift, self.hidden = shift, None

    def hook(self, module, inputs, output) -> None:
        hidden = inputs[0]
        if self.shift:  # as ModelAdapter.logits: position i-1's state predicts token i
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        self.hidden = hidden


def one_layer_config(config_class: type, **shape):
    """A one-layer ``config_class`` config with the given shape and SDPA attention (it takes a boolean mask, so the
    layer runs bidirectionally)."""
    layer = config_class(num_hidden_layers=1, **shape)
    layer._attn_implementation = "sdpa"
    return layer


def bidirectional_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] key validity -> [B, 1, L, L] boolean mask: every query sees every valid key (no causality)."""
    keys = attention_mask.bool()[:, None, None, :]
    return keys.expand(-1, 1, attention_mask.shape[1], -1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions restart at 0 on each row's first real token (left padding does not shift RoPE)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.cache
def cache_argument(model_class: type) -> str:
    """The name a model class's forward takes its cache under: transformers 5.x renamed ``past_key_values`` to
    ``cache`` (the old name warns). Looked up once per class (``inspect.signature`` costs ~0.2 ms, 3% of a tiny
    model's cached decoding step)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cached_forward(model, cache=None, **inputs):
    """``model(**inputs, use_cache=True)`` handing it ``cache`` under :func:`cache_argument`'s name and returning
    (output, its cache)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = cache_argument(type(base))
    if cache is not None:
        inputs[name] = cache
    out = model(**inputs, use_cache=True)
    return out, out[name] if name in out else out.past_key_values


def layer_states(cache) -> list[tuple]:
    """Each layer's (keys, values) [B, H, L, D] of a transformers cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]
