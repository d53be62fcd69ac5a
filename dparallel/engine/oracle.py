"""The "extremely greedy parallel" oracle (Learn2PD): replay a reference decode, committing every masked position whose
prediction already equals the reference token. The ceiling a per-token filter can reach."""

from __future__ import annotations

import torch

from dparallel.adapters.base import ModelAdapter
from dparallel.core.errors import require
from dparallel.engine.rules import Proposal, Rule, best_masked


class OracleRule(Rule):
    """Learn2PD's "extremely greedy parallel" replay against a reference canvas ``reference`` [B, G] (one row per
    prompt of the batch): commit every masked position of the block whose proposal equals the reference; when
    none does, commit the reference token at the top-confidence masked position (the stall guard). Its output is
    the reference; its NFE is the ceiling a perfect filter could reach on that reference."""

    name = "oracle"

    def __init__(self, reference: torch.Tensor):
        self.reference = torch.as_tensor(reference, dtype=torch.long)

    def select(self, p: Proposal) -> torch.Tensor:
        if self.reference.device != p.tokens.device:
            self.reference = self.reference.to(p.tokens.device)
        ref = self.reference[:, p.offset : p.offset + p.tokens.shape[1]]
        require(ref.shape == p.tokens.shape, f"oracle reference {tuple(self.reference.shape)} does not fit the batch")
        match = (p.tokens == ref) & p.masked
        guard = best_masked(p.confidence, p.masked) & ~match.any(dim=1, keepdim=True)
        p.tokens = torch.where(guard, ref, p.tokens)
        return match | guard


def oracle_decode(adapter: ModelAdapter, prompts: list[list[int]], reference, config):
    """Replay ``reference`` [B, G] with the oracle rule; returns the sampler's (tokens, order, stats)."""
    from dparallel.engine.decoder import Decoder

    return Decoder(adapter, config, rule=OracleRule(reference)).run(prompts)
