"""The exact block-wise KV cache of a converted block-diffusion model (the engine's ``cache=block``).

Under block-causal attention a finished block's keys/values depend only on itself and earlier blocks, all clean,
so they never change once the block is done: caching them is exact (no refresh, no approximation). Each engine
step forwards the positions not yet cached up to the end of the active attention block ``[cached, bhi)``:

- the first step of a block forwards the block just finished (now clean) together with the new, masked one, in
  one forward; the finished block's keys/values join the cache (``cached`` moves to the new block's start);
- later steps forward only the active attention block.

So a block of B tokens costs as many forwards as its decoding steps, and the prompt is prefilled in the first.
With sub-blocks (the engine's ``block_length`` < the model's ``block_size``, Fast-dLLM v2's sub-block decoding)
the whole attention block is forwarded every step and only finished attention blocks are cached, so sub-block
decoding stays exact too.

Token shift: the logit of position p comes from position p - 1. For the first token of a block that is the last
token of the previous block, computed when that block was forwarded clean; it is kept in ``last_logits``.
"""

from __future__ import annotations

import torch

from dparallel.core.errors import require


class BlockCache:
    """The engine's cache object for ``cache=block`` (``refreshes = False``: every call is a ``step``)."""

    mode = "block"
    refreshes = False
    lead = 0  # a step's logits start at the window (ContextCache.lead)

    def __init__(self, adapter, mode: str = "block"):
        require(
            "block" in getattr(adapter, "cache_modes", ()),
            f"cache=block needs a converted block-diffusion model (family block), not {adapter.family!r}",
        )
        self.adapter = adapter
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cached = 0  # canvas positions [0, cached) have their keys/values in ``layers``
        self.last_logits: torch.Tensor | None = None  # [B, V] raw logits at position cached - 1

    def step(self, x: torch.Tensor, attn: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Logits [B, hi - lo, V] of the engine's window [lo, hi), aligned so row j predicts position lo + j."""
        # block_ids on the host (plain ints): the model block holding [lo, hi), without a device sync per step
        size, length = self.adapter.block_size, x.shape[1]
        shift = (-length) % size  # blocks are counted back from the sequence end (masks.block_ids)
        block = (lo + shift) // size
        require(
            (hi - 1 + shift) // size == block,
            f"decoding block_length={hi - lo} must divide the model's block_size={size} "
            "(and gen_length must be a multiple of it)",
        )
        b_lo, b_hi = max(block * size - shift, 0), min((block + 1) * size - shift, length)
        start = self.cached
        raw, layers = self.adapter.forward_span(x, attn, start, b_hi, self.layers or None)
        if b_lo > start and self.adapter.shift_logits:
            self.last_logits = raw[:, b_lo - 1 - start]  # the clean logit that predicts the block's first token
        self.layers = [(k[:, :, :b_lo], v[:, :, :b_lo]) for k, v in layers]
        self.cached = b_lo
        if not self.adapter.shift_logits:
            return raw[:, lo - start : hi - start]
        if lo - 1 >= start:
            return raw[:, lo - 1 - start : hi - 1 - start]
        return torch.cat([self.last_logits[:, None], raw[:, : hi - 1 - start]], dim=1)
