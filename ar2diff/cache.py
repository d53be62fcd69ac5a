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

Live rows only: a step forwards only the rows that still have a mask in the engine's window; the others get
logits 0 (the engine commits nothing there: no mask). A batch waits for its slowest row in every block, so late
steps would otherwise recompute rows that are done (on the tiny suite this took the batch-16 gap to the AR parent
from ~2x to 1.3x, docs/methods/ar2diff.md). It stays exact: a row with no mask at a block's first step has ended
(the engine fills everything after an accepted EOS, and a rule commits only inside its window), so it never needs
keys/values again; the cache holds the rows live at the last block start (``rows``, sorted batch indices), and a
step whose live rows differ from them checks that they are a subset.

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
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (keys, values) [len(rows), h, cached, d]
        self.rows: torch.Tensor | None = None  # [R] the batch rows whose keys/values ``layers`` holds
        self.cached = 0  # canvas positions [0, cached) have their keys/values in ``layers``
        self.last_logits: torch.Tensor | None = None  # [R, V] raw logits at position cached - 1, per cached row

    def _block(self, lo: int, hi: int, length: int) -> tuple[int, int]:
        """The model block [b_lo, b_hi) holding the window [lo, hi), on the host (no device sync per step)."""
        size = self.adapter.block_size
        shift = (-length) % size  # blocks are counted back from the sequence end (masks.block_ids)
        block = (lo + shift) // size
        require(
            (hi - 1 + shift) // size == block,
            f"decoding block_length={hi - lo} must divide the model's block_size={size} "
            "(and gen_length must be a multiple of it)",
        )
        return max(block * size - shift, 0), min((block + 1) * size - shift, length)

    def _live(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The batch rows with a mask in [lo, hi), sorted ([n])."""
        live = (x[:, lo:hi] == self.adapter.ids.mask).any(dim=1).nonzero().squeeze(1)
        if len(live) == 0:  # nothing to decode (a step after the block ended): forward one cached row for the shapes
            live = self.rows[:1]
        return live

    def _gather(self, live: torch.Tensor) -> tuple[list, torch.Tensor | None]:
        """The cached keys/values and ``last_logits`` of the ``live`` rows (a subset of ``rows``)."""
        if len(live) == len(self.rows):
            return self.layers, self.last_logits
        where = torch.searchsorted(self.rows, live).clamp(max=len(self.rows) - 1)  # [n] positions in ``rows``
        require(
            bool((self.rows[where] == live).all()),
            "cache=block: a row gained masks after it ended (a rule committed outside its window?)",
        )
        last = self.last_logits[where] if self.last_logits is not None else None
        return [(k[where], v[where]) for k, v in self.layers], last

    def step(self, x: torch.Tensor, attn: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Logits [B, hi - lo, V] of the engine's window [lo, hi), aligned so row j predicts position lo + j."""
        b_lo, b_hi = self._block(lo, hi, x.shape[1])
        start, shift = self.cached, self.adapter.shift_logits
        new_block = b_lo > start  # always at the first call: the prompt comes before the first block
        live = self._live(x, lo, hi)
        layers, last = self._gather(live) if self.rows is not None else ([], None)
        raw, layers = self.adapter.forward_span(x[live], attn[live], start, b_hi, layers or None)
        if new_block:  # keep the finished blocks' keys/values of the live rows
            self.layers = [(k[:, :, :b_lo], v[:, :, :b_lo]) for k, v in layers]
            self.rows, self.cached = live, b_lo
            self.last_logits = last = raw[:, b_lo - 1 - start] if shift else None  # predicts the block's first token
        if not shift:
            out = raw[:, lo - start : hi - start]
        elif lo - 1 >= start:
            out = raw[:, lo - 1 - start : hi - 1 - start]
        else:
            out = torch.cat([last[:, None], raw[:, : hi - 1 - start]], dim=1)
        if len(live) == len(x):
            return out
        full = out.new_zeros((len(x), *out.shape[1:]))
        full[live] = out
        return full
