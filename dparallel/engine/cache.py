"""Fast-dLLM's key/value caches for bidirectional dLLMs, over transformers' ``DynamicCache``.

At a refresh (the first step of every block, and every ``cache_refresh`` steps inside it when that is > 0) the
whole canvas goes through the model once and the keys/values of the *context* are kept:

- ``prefix``: the context is everything before the active block; later steps forward the block and everything
  after it (``[lo, L)``) against the cached prefix.
- ``dual``: the context is everything outside the active block (prefix and suffix); later steps forward only the
  block (``[lo, hi)``).

Both are approximations: in a bidirectional model the context's keys/values depend on the block's tokens, which
change between refreshes. Attention has no notion of key order (positions are baked in by RoPE before caching),
so the cache holds the context keys in any order and the query block is appended after them.

``static``: the same keys and values in fixed shapes, as a CUDA graph needs them. A ``StaticCache`` holds one slot
per canvas position; a refresh writes them all, a step rewrites only its query's slots (transformers' StaticCache
writes at its own offset, ``cumulative_length``, reset in place to the query's first position) and attends over
every slot. The keys are the dynamic path's (context from the refresh, the query fresh), so the tokens are too.
"""

from __future__ import annotations

import torch

from dparallel.adapters.base import ModelAdapter, position_ids_from_mask
from dparallel.core.errors import require
from dparallel.engine.config import CACHE_MODES


class ContextCache:
    """Holds the context keys/values of the active block and answers window forwards against them."""

    refreshes = True  # the sampler calls ``refresh`` at a block's first step (BlockCache: always ``step``)

    def __init__(self, adapter: ModelAdapter, mode: str, static: bool = False, cuda_graph: bool = False):
        require(mode in CACHE_MODES, f"cache={mode!r}: choose from {', '.join(CACHE_MODES)}")
        require(
            mode in adapter.cache_modes,
            f"cache={mode} is not supported for the {adapter.family} family: use cache="
            f"{' or '.join(adapter.cache_modes)}",
        )
        self.adapter, self.mode, self.static = adapter, mode, static
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.context: torch.Tensor | None = None  # [Lc] canvas positions held in the cache, in cache order
        self.slots = None  # static: transformers' StaticCache over the whole canvas, one slot per position
        self.cuda_graph = cuda_graph
        self.graph = None  # cuda_graph: the captured static step (dparallel.engine.graphs.GraphStep)

    @property
    def lead(self) -> int:
        """Positions a step's query starts before the window: a shifted family (Dream) predicts position lo from
        lo - 1, so its query starts one position earlier (and its hidden states are cut the same way)."""
        return int(self.adapter.shift_logits)

    def query_span(self, lo: int, hi: int, length: int) -> tuple[int, int]:
        """The positions a cached step forwards: the block (dual) or the block and everything after (prefix), from
        ``lead`` positions before the block."""
        require(lo - self.lead >= 0, "a shifted model needs a prompt before the canvas to decode with a cache")
        return (lo - self.lead, hi) if self.mode == "dual" else (lo - self.lead, length)

    def refresh(self, x: torch.Tensor, attn: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Full forward over the canvas; keep the context's keys/values. Returns logits [B, L, V]."""
        if self.static:
            if self.slots is None:
                self.slots = self.adapter.static_cache(x.shape[0], x.shape[1])
                if self.cuda_graph:
                    from dparallel.engine.graphs import GraphStep

                    self.graph = GraphStep(self.adapter, self.slots)
            return self.adapter.prefill_static(x, attn, self.slots)
        logits, layers = self.adapter.prefill(x, attn)
        q_lo, q_hi = self.query_span(lo, hi, x.shape[1])
        positions = torch.arange(x.shape[1], device=x.device)
        self.context = positions[(positions < q_lo) | (positions >= q_hi)]
        self.layers = [(k[:, :, self.context], v[:, :, self.context]) for k, v in layers]
        return logits

    def step(self, x: torch.Tensor, attn: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Forward only the query span against the cached context. Returns logits [B, q_hi - lo, V] from ``lo``."""
        q_lo, q_hi = self.query_span(lo, hi, x.shape[1])
        positions = position_ids_from_mask(attn)[:, q_lo:q_hi]
        if self.static:  # the query's keys/values overwrite their own slots; every slot is a key
            step = self.graph or self._static_step
            return step(x[:, q_lo:q_hi], positions, attn, q_lo)[:, lo - q_lo :]
        keys = torch.cat([attn[:, self.context], attn[:, q_lo:q_hi]], dim=1)  # [B, Lc + Wq]: context, then query
        logits = self.adapter.extend(x[:, q_lo:q_hi], positions, keys, self.layers)
        return logits[:, lo - q_lo :]  # a shifted family's leading row only fed the window's first logit

    def _static_step(self, ids: torch.Tensor, positions: torch.Tensor, attn: torch.Tensor, offset: int) -> torch.Tensor:
        """The eager static step (what GraphStep replays): rewrite the query's slots, attend over all of them."""
        return self.adapter.extend_static(ids, positions, attn, self.slots, offset)


def build_cache(adapter: ModelAdapter, mode: str, static: bool = False, cuda_graph: bool = False):
    """The cache object of ``mode``: Fast-dLLM's prefix/dual caches (``static``: in a preallocated StaticCache),
    or the exact block cache of a converted block-diffusion model (``block``)."""
    if mode == "block":
        from dparallel.ar2diff.cache import BlockCache

        return BlockCache(adapter)
    return ContextCache(adapter, mode, static, cuda_graph)
