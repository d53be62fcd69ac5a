"""Decoding the ``ar`` family: greedy, one token per forward, through transformers' ``generate`` and KV cache."""

from __future__ import annotations

import time

import torch

from dparallel.ar2diff.family import ARAdapter
from dparallel.core.errors import require
from dparallel.engine.config import DecodeConfig, DecodeStats


class ARDecoder:
    """Greedy decoding through ``model.generate`` (transformers' KV cache). Same interface as the engine's
    ``Decoder``: the answer canvas [B, G] (EOS after the first EOS), the commit order and per-row stats; NFE is the
    row's answer length (one forward per token, the prompt's prefill included in the first)."""

    def __init__(self, adapter: ARAdapter, config: DecodeConfig, rule=None):
        config.validate()
        require(config.temperature == 0, "the ar family decodes greedily: set temperature=0")
        self.adapter, self.config = adapter, config

    @torch.no_grad()
    def run(self, prompts: list[list[int]], on_step=None) -> tuple[torch.Tensor, torch.Tensor, list[DecodeStats]]:
        require(on_step is None, "the ar family does not report per-step statistics: record with a diffusion model")
        ids, G = self.adapter.ids, self.config.gen_length
        width = max(len(p) for p in prompts)
        x = torch.tensor([[ids.pad] * (width - len(p)) + p for p in prompts], device=self.adapter.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=x.device)
        start = time.perf_counter()
        out = self.adapter.model.generate(
            input_ids=x,
            attention_mask=attn,
            max_new_tokens=G,
            do_sample=False,
            eos_token_id=sorted({ids.eos, ids.eot}),
            pad_token_id=ids.pad,
        )
        wall = time.perf_counter() - start
        canvas = torch.full((len(prompts), G), ids.eos, dtype=torch.long, device=x.device)
        new = out[:, width:]
        canvas[:, : new.shape[1]] = new
        ended = (canvas == ids.eos) | (canvas == ids.eot)
        after = ended.long().cumsum(1) - ended.long() > 0  # positions after the first EOS/EoT
        canvas = canvas.masked_fill(after, ids.eos)
        order = torch.arange(G, device=x.device)[None, :].expand(len(prompts), -1).clone()
        stats = []
        for row in canvas.tolist():
            n = self.adapter.answer_length(row)
            stats.append(DecodeStats(n, n, wall / len(prompts)))
        return canvas, order, stats
