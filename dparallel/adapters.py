"""Model adapters: the only place that knows a model family's quirks.

An adapter wraps a loaded model and its tokenizer and exposes one forward, ``logits(input_ids, attention_mask)``,
whose output ``[B, L, V]`` is aligned so that ``logits[:, i]`` predicts the token at position ``i`` (the logit
shift of Dream and of converted AR models is undone here), with bidirectional attention over the valid keys of
each row (left padding is masked out and positions restart at 0 on the first real token, so a batched row
decodes like the same row alone).

Families: ``tiny`` (a stock Llama class used bidirectionally; the embedded default), ``llada`` and ``dream``
(their checkpoints in stock Llama / Qwen2 classes, see :mod:`dparallel.stock`), ``llada-remote`` and
``dream-remote`` (their remote code, the fallback), ``hf-mlm`` (any ``AutoModelForMaskedLM``). Register a new one
with :func:`register_family`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

import torch
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    StaticCache,
)
from transformers.utils import logging as hf_logging

from dparallel.errors import DParallelError, first_line, require
from dparallel.stock import LLADA_KEY_MAPPING, dream_qwen2_config, llada_llama_config, raw_config

BUILTIN_PREFIX = "builtin:"
MANIFEST = "dparallel.json"


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
    supports_cache: ClassVar[bool] = False  # implements prefill/extend (prefix and dual caches)

    def __init__(self, model: PreTrainedModel, tokenizer, ids: SpecialIds, name: str = "", revision: str = ""):
        require(
            ids.mask != ids.pad,
            f"mask id {ids.mask} equals the pad id: give the tokenizer a distinct pad token (or set model.pad_id)",
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
    def sampler_layer_class(cls, config) -> tuple[type, type, object]:
        """(decoder layer class, rotary embedding class, layer config) of the family's stock transformers layer with
        the base's shape (one layer), for components that add a layer over the base's hidden states."""
        raise DParallelError(f"the {cls.family} family has no sampler layer class: use tiny, llada or dream")

    # ---- text ----------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
        """Token ids of each prompt, through the tokenizer's chat template when asked."""
        if chat_template:
            require(
                getattr(self.tokenizer, "chat_template", None) is not None,
                f"the tokenizer of {self.name!r} has no chat template: set data.chat_template=false",
            )
            return [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
                for p in prompts
            ]
        return [self.tokenizer(p).input_ids for p in prompts]

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


class BidirectionalAdapter(ModelAdapter):
    """A stock transformers decoder (``LlamaForCausalLM``, ``Qwen2ForCausalLM``) made bidirectional by an explicit
    4D attention mask; ``prefill``/``extend`` give the prefix and dual caches over transformers' own cache."""

    supports_cache = True
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
    def sampler_layer_class(cls, config) -> tuple[type, type, object]:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        layer = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 1})
        layer._attn_implementation = "sdpa"
        return LlamaDecoderLayer, LlamaRotaryEmbedding, layer

    def prefill(self, x: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Full forward. Returns logits [B, L, V] (aligned as :meth:`logits`) and each layer's (keys, values)
        [B, H, L, D]."""
        out = self.model(
            input_ids=x,
            attention_mask=bidirectional_mask(attn),
            position_ids=position_ids_from_mask(attn),
            use_cache=True,
        )
        return self._align(out.logits), [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    def extend(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, layers: list) -> torch.Tensor:
        """Forward ``ids`` [B, W] at ``positions`` against cached (keys, values) per layer; ``key_valid`` [B, Lc + W]
        marks the valid keys (cached context first, then the query). Returns logits [B, W, V] aligned as
        :meth:`logits` within the query (a shifted family's first row has no predecessor there: the cache passes
        one leading position more and drops that row)."""
        cache = DynamicCache()
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)  # a fresh cache per call: the query's own keys must not accumulate
        mask = key_valid.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
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
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        return self._align(out.logits)


class TinyAdapter(BidirectionalAdapter):
    """The embedded default: a stock ``LlamaForCausalLM`` used bidirectionally."""

    family = "tiny"

    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)


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
    def sampler_layer_class(cls, config) -> tuple[type, type, object]:
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


class LLaDARemoteAdapter(ModelAdapter):
    """LLaDA through its remote code (the fallback: ``model.family=llada-remote``). Its linear layers are named
    q/k/v_proj, attn_out, ff_proj, up_proj, ff_out (not o/gate/down_proj: a LoRA on those names would silently
    train nothing)."""

    family = "llada-remote"
    trust_remote_code = True
    lora_targets = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    default_ids = LLaDAAdapter.default_ids

    @classmethod
    def sampler_layer_class(cls, config) -> tuple[type, type, object]:
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


class DreamRemoteAdapter(ModelAdapter):
    """Dream through its remote code (the fallback: ``model.family=dream-remote``)."""

    family = "dream-remote"
    trust_remote_code = True
    shift_logits = True
    lora_targets = BidirectionalAdapter.lora_targets
    default_ids = DreamAdapter.default_ids
    sampler_layer_class = DreamAdapter.sampler_layer_class

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None or bool(attention_mask.all()):
            return self.model(input_ids, "full").logits
        # Dream's remote code takes a 4D boolean mask and explicit positions (its generation utils do the same).
        return self.model(input_ids, bidirectional_mask(attention_mask), position_ids_from_mask(attention_mask)).logits


class MaskedLMAdapter(ModelAdapter):
    """Any Hugging Face masked LM (BERT, RoBERTa, ModernBERT ...): the mask id comes from its tokenizer."""

    family = "hf-mlm"
    lora_targets = ("query", "key", "value", "dense")

    @classmethod
    def load_model(cls, path: str, dtype: torch.dtype, revision: str | None) -> PreTrainedModel:
        return AutoModelForMaskedLM.from_pretrained(path, dtype=dtype, revision=revision)


FAMILIES: dict[str, type[ModelAdapter]] = {}


def register_family(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Add an adapter class to the registry under its ``family`` name (usable as a decorator)."""
    FAMILIES[adapter.family] = adapter
    return adapter


for _adapter in (TinyAdapter, LLaDAAdapter, DreamAdapter, LLaDARemoteAdapter, DreamRemoteAdapter, MaskedLMAdapter):
    register_family(_adapter)


def resolve_path(path: str) -> str:
    """``builtin:NAME`` -> the folder shipped inside the package; anything else is returned unchanged."""
    if path.startswith(BUILTIN_PREFIX):
        folder = resources.files("dparallel") / "assets" / path[len(BUILTIN_PREFIX) :]
        require(folder.is_dir(), f"no built-in model {path!r}: the shipped one is 'builtin:tiny-teacher'")
        return str(folder)
    return path


def read_manifest(path: str) -> dict:
    """The ``dparallel.json`` of a local folder, or {} when there is none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DParallelError(f"{file} is not valid JSON ({e.msg}): re-export the folder") from None


def download(repo_id: str, revision: str | None) -> str:
    """A Hub repo's files in the local cache (nothing is fetched when HF_HUB_OFFLINE=1 and it is cached)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision)
    except Exception as e:  # offline mode, no network, unknown repo, auth: one line, no traceback
        first = first_line(e)
        raise DParallelError(
            f"cannot get {repo_id!r} from the Hub ({first}): pass a local folder, or go online"
        ) from None


def load_adapter(
    path: str,
    family: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
) -> ModelAdapter:
    """Load model + tokenizer at ``path`` (a local folder, ``builtin:NAME`` or a Hub id) through its family.

    The family comes from the argument, else from the folder's ``dparallel.json``. Nothing is downloaded when
    ``path`` is local; a Hub id downloads the weights (HF_HUB_OFFLINE=1 turns that into a clear error).
    """
    local = resolve_path(path)
    require(
        not local.startswith((".", "/")) or Path(local).is_dir(),
        f"model folder {local} does not exist: check model.path",
    )
    if not Path(local).is_dir():
        local = download(local, revision)
    manifest = read_manifest(local)
    family = family or manifest.get("family")
    require(family is not None, f"cannot tell the model family of {path!r}: set model.family ({', '.join(FAMILIES)})")
    require(family in FAMILIES, f"unknown model family {family!r}: choose from {', '.join(sorted(FAMILIES))}")
    cls = FAMILIES[family]
    torch_dtype = getattr(torch, dtype)
    hf_logging.disable_progress_bar()  # a per-tensor loading bar is noise next to our own progress output
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, revision=revision, trust_remote_code=cls.trust_remote_code)
        model = cls.load_model(local, torch_dtype, revision)
    except OSError as e:
        first = first_line(e)
        raise DParallelError(f"cannot load model {path!r}: {first}") from None
    model = model.to(device).eval()
    ids = cls.default_ids(tokenizer)
    overrides = manifest.get("ids", {})
    if overrides:
        ids = SpecialIds(**{**ids.__dict__, **overrides})
    return cls(model, tokenizer, ids, name=manifest.get("name", path), revision=revision or "")


import dparallel.ar2diff.family  # noqa: E402, F401  (registers the `ar` and `block` families of ar2diff)
