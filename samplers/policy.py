"""RL unmasking policy: a one-block transformer over per-position confidences that decides, step by step, which
masked positions of the active block to commit (the dLLM itself stays frozen and proposes the tokens).

State at a step: the answer canvas (length L) of one row. Per position ``i``:

- features ``f_i`` from the dLLM's softmax at this forward (:func:`dparallel.engine.rules.token_statistics`:
  ``conf`` = max probability by default; ``entropy``, ``margin`` and the ``topk`` largest probabilities
  optionally), and the conflicts of its proposal (``repeat``: the argmax is already committed elsewhere on the
  canvas; ``clash``: a more confident masked position proposes the same token): what parallel decoding breaks on
  many-answers tasks, and what confidences alone cannot see; committed positions read as certain (conf 1,
  entropy 0, margin 1, no conflict, top-k = [1, 0, ...]), so the policy needs no logits outside the forward's
  span and does not depend on the vocabulary;
- the mask bit ``m_i`` and the time ``t = forward passes used / L``: they condition the block through AdaLN.

Network (DiT-style): ``h = Linear(F -> d)(f)``; ``c = MLP([m_i, t])`` [L, d]; one transformer block whose two
sub-layers (self-attention over the whole canvas, FFN) are modulated by ``(shift, scale, gate) = Linear(SiLU(c))``
(adaLN-Zero: the modulation starts at zero, so the block starts as the identity); ``LayerNorm``; ``Linear(d -> 1)``
with its bias at ``init_bias`` (−2: ``sigmoid(−2) ≈ 0.12`` per position, a slow start). No position embedding and
time normalised by L: the same weights run at any gen length and on any base with the same mask convention.

Action: independent Bernoulli per masked position of the active block, ``p_i = sigmoid(logit_i / T)``. When a
sample selects nothing the environment commits the policy's most probable masked position (so every step commits
at least one token); that forcing is part of the environment, and the action's log-likelihood is that of the
sampled bits. Greedy (evaluation): commit ``p_i > threshold`` (0.5), else the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dparallel.core.errors import require
from dparallel.engine.rules import (
    CERTAIN,
    CONFLICTS,
    STATISTICS,
    Proposal,
    Rule,
    StepContext,
    best_masked,
    conflicts,
    token_statistics,
)

FEATURES = (*STATISTICS, *CONFLICTS)
TIE = 1e-4  # policy logits closer than this are a tie for the fallback commit (lowest index wins)


class UnmaskingPolicy(nn.Module):
    """Per-position unmasking logits [B, L] from features [B, L, F], mask bits [B, L] and time [B]."""

    def __init__(
        self,
        features: Sequence[str] = ("conf",),
        topk: int = 0,
        dim: int = 128,
        ffn: int = 512,
        heads: int = 2,
        init_bias: float = -2.0,
    ):
        super().__init__()
        bad = [f for f in features if f not in FEATURES]
        require(not bad, f"policy.features={list(features)}: choose from {', '.join(FEATURES)}")
        require(len(features) + topk > 0, "the policy needs at least one feature (policy.features or policy.topk)")
        require(topk == 0 or topk >= 2, f"policy.topk={topk}: use 0 (off) or >= 2 probabilities")
        require(dim % heads == 0, f"policy.dim={dim} is not divisible by policy.heads={heads}")
        self.features, self.topk = tuple(features), topk
        self.dim, self.ffn_dim, self.heads = dim, ffn, heads
        self.embed = nn.Linear(self.num_features, dim)
        self.cond = nn.Sequential(nn.Linear(2, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        nn.init.zeros_(self.modulation[1].weight)  # adaLN-Zero: gates start at 0, the block is the identity
        nn.init.zeros_(self.modulation[1].bias)
        nn.init.zeros_(self.head.weight)  # every position starts at sigmoid(init_bias)
        nn.init.constant_(self.head.bias, init_bias)

    @property
    def num_features(self) -> int:
        return len(self.features) + self.topk

    def certain(self, device=None) -> torch.Tensor:
        """[F] what a committed position reads as: conf 1, entropy 0, margin 1, no conflict, top-k probabilities
        [1, 0, ...]."""
        values = [CERTAIN.get(name, 0.0) for name in self.features]
        values += [1.0] * min(self.topk, 1) + [0.0] * max(self.topk - 1, 0)
        return torch.tensor(values, device=device)

    def features_of(
        self,
        logits: torch.Tensor,
        masked: torch.Tensor,
        canvas: torch.Tensor | None = None,
        proposed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-position inputs [B, S, F] from logits [B, S, V]; committed (``~masked``) positions read as
        certain. ``repeat``/``clash`` compare each masked position's ``proposed`` token [B, S] (the decoder's
        candidate) with the committed tokens of ``canvas`` [B, S] and the other proposals
        (:func:`~dparallel.engine.rules.conflicts`). Shared by decoding and training (the rollout records exactly
        these numbers)."""
        stats = token_statistics(logits) if self.features else {}
        if any(f in CONFLICTS for f in self.features):
            require(canvas is not None and proposed is not None, "the conflict features need the canvas and proposals")
            stats.update(conflicts({"proposed": proposed, "block": canvas, "conf": stats["conf"]}, masked))
        parts = [stats[name].float() for name in self.features]
        if self.topk:
            parts.extend(torch.softmax(logits.float(), dim=-1).topk(self.topk, dim=-1).values.unbind(-1))
        feats = torch.stack(parts, dim=-1)  # [B, S, F]
        return torch.where(masked[..., None], feats, self.certain(feats.device))

    def forward(self, feats: torch.Tensor, masked: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """feats [B, L, F], masked [B, L] bool, time [B] (forwards used / L) -> logits [B, L]."""
        n, length = masked.shape
        cond_in = torch.stack([masked.to(feats.dtype), time.to(feats.dtype)[:, None].expand(n, length)], dim=-1)
        c = self.cond(cond_in)  # [B, L, d]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        h = self.embed(feats)
        a = self.norm1(h) * (1 + scale1) + shift1
        h = h + gate1 * self.attn(a, a, a, need_weights=False)[0]
        m = self.norm2(h) * (1 + scale2) + shift2
        h = h + gate2 * self.mlp(m)
        return self.head(self.norm_out(h)).squeeze(-1)


def bernoulli_log_prob(logits: torch.Tensor, action: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Joint log-likelihood [N] of the Bernoulli bits ``action`` [N, W] over the ``eligible`` [N, W] positions,
    with ``p = sigmoid(logits)``: sum_i a_i log p_i + (1 - a_i) log(1 - p_i) (``logsigmoid`` for stability)."""
    lp = torch.where(action, F.logsigmoid(logits), F.logsigmoid(-logits))
    return (lp * eligible).sum(dim=-1)


def bernoulli_kl(logits: torch.Tensor, ref_logits: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) [N] between independent Bernoullis, summed over the eligible positions."""
    p, lp, lq = torch.sigmoid(logits), F.logsigmoid(logits), F.logsigmoid(ref_logits)
    l1p, l1q = F.logsigmoid(-logits), F.logsigmoid(-ref_logits)
    return ((p * (lp - lq) + (1 - p) * (l1p - l1q)) * eligible).sum(dim=-1)


@dataclass
class Rollout:
    """What a recording :class:`PolicyRule` keeps, one dict per step (rows ``B``, canvas ``L``, block ``W``):
    ``feats`` [B, L, F], ``masked`` [B, L], ``time`` [B], ``offset`` (answer-canvas index of the active block),
    ``action`` [B, W] (the sampled bits, or the expert's commits), ``eligible`` [B, W] (masked in the block),
    ``active`` [B] (the row still had masks in the block: a real step), ``old_log_prob`` [B] (the acting policy's
    log-likelihood of ``action`` at the rollout temperature) and ``expert_match`` [B] (``action`` equals the
    expert rule's choice at this state; expert steering's mixture likelihood)."""

    steps: list[dict] = field(default_factory=list)


class PolicyRule(Rule):
    """The ``policy`` decoding rule. ``mode``: ``greedy`` (commit ``p > threshold``, else the argmax; evaluation),
    ``sample`` (Bernoulli at ``temperature``, drawn from the sampler's generator so a seed reproduces a run; an
    empty sample commits the argmax) or ``expert`` (commit what ``expert`` selects; the policy only scores it).
    ``record=True`` keeps a :class:`Rollout` for training."""

    name = "policy"

    def __init__(
        self,
        policy: UnmaskingPolicy,
        mask_id: int,
        *,
        mode: str = "greedy",
        temperature: float = 1.0,
        threshold: float = 0.5,
        expert: Rule | None = None,
        record: bool = False,
    ):
        require(mode in ("greedy", "sample", "expert"), f"policy mode {mode!r}: use greedy, sample or expert")
        require(temperature > 0, f"policy temperature {temperature} must be > 0")
        require(0.0 < threshold < 1.0, f"policy threshold {threshold} must be in (0, 1)")
        require(mode != "expert" or expert is not None, "policy mode expert needs an expert rule")
        self.policy, self.mask_id, self.mode = policy, mask_id, mode
        self.temperature, self.threshold, self.expert = temperature, threshold, expert
        self.rollout = Rollout() if record else None
        self.policy_calls = 0
        # bits the policy chose (before forcing) over eligible positions: the unmask rate; device tensors, read once
        # per rollout (no host sync per decoding step)
        self.chosen = torch.zeros(())
        self.eligible = torch.zeros(())

    def state(self, p: Proposal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(feats [B, L, F], masked [B, L], time [B]) of the answer canvas before this step's commits."""
        ctx: StepContext | None = p.context
        require(ctx is not None, "the policy rule needs the decoding context (dparallel's Decoder provides it)")
        width, first = ctx.prompt_width, ctx.first
        masked = ctx.x[:, width:] == self.mask_id  # [B, L]
        n, length = masked.shape
        # positions the forward did not cover (outside the window under a dual cache): certain when committed,
        # zeros when masked; the covered span gets the real statistics
        feats = torch.where(masked[..., None], 0.0, self.policy.certain(masked.device)).expand(n, length, -1).clone()
        lo, hi = max(first, width), first + ctx.logits.shape[1]
        span = slice(lo - width, hi - width)
        covered = slice(lo - first, hi - first)
        proposed = ctx.proposed[:, covered] if ctx.proposed is not None else None
        feats[:, span] = self.policy.features_of(ctx.logits[:, covered], masked[:, span], ctx.x[:, lo:hi], proposed)
        return feats, masked, ctx.nfe.float() / length

    def select(self, p: Proposal) -> torch.Tensor:
        feats, masked, time = self.state(p)
        param = next(self.policy.parameters())
        with torch.no_grad():
            logits = self.policy(feats.to(param.dtype), masked, time).float()  # [B, L]
        self.policy_calls += 1
        w = p.masked.shape[1]
        window = logits[:, p.offset : p.offset + w] / self.temperature  # [B, W]
        eligible = p.masked
        if self.mode == "expert":
            action = self.expert.select(p) & eligible
        elif self.mode == "sample":
            u = torch.rand(window.shape, device=window.device, generator=p.context.generator)
            action = (u < torch.sigmoid(window)) & eligible
        else:
            action = (torch.sigmoid(window) > self.threshold) & eligible
        self.chosen = self.chosen.to(action.device) + action.sum()
        self.eligible = self.eligible.to(action.device) + eligible.sum()
        # The fallback commit when the policy chose none: its best position, scores within TIE of each other being a
        # tie broken by the lowest index. A saturated teacher gives many positions the same features up to float
        # noise (~1e-6 between a row batched and alone), and without the rounding that noise picks the position.
        tied = torch.round(window / TIE) * TIE
        forced = best_masked(tied, eligible) & ~action.any(dim=1, keepdim=True)
        if self.rollout is not None:
            self._record(p, feats, masked, time, window, action, eligible)
        return action | forced

    def _record(self, p: Proposal, feats, masked, time, window, action, eligible) -> None:
        match = torch.zeros(action.shape[0], dtype=torch.bool, device=action.device)
        if self.expert is not None:
            match = ((self.expert.select(p) & eligible) == action).all(dim=1)
        self.rollout.steps.append(
            {
                "feats": feats,
                "masked": masked,
                "time": time,
                "offset": p.offset,
                "action": action,
                "eligible": eligible,
                "active": eligible.any(dim=1),
                "old_log_prob": bernoulli_log_prob(window, action, eligible),
                "expert_match": match,
            }
        )


# ---- the component --------------------------------------------------------------------------------------------


def load_policy(folder, manifest: dict | None = None) -> tuple[UnmaskingPolicy, dict]:
    """The policy of a component folder and its manifest."""
    from dparallel.adapters.folder import read_manifest
    from dparallel.engine.components import load_weights

    manifest = manifest if manifest is not None else read_manifest(str(folder))
    require(manifest.get("component") == "policy", f"{folder} is not a policy component (no component: policy)")
    shape = manifest.get("policy") or {}
    policy = UnmaskingPolicy(
        shape.get("features", ["conf"]), int(shape.get("topk", 0)), int(shape.get("dim", 128)),
        int(shape.get("ffn", 512)), int(shape.get("heads", 2)), float(shape.get("init_bias", -2.0)),
    )  # fmt: skip
    return load_weights(folder, "policy", policy, manifest), manifest


def attach_policy(generator, folder, manifest: dict | None = None) -> None:
    """Give ``generator`` the ``policy`` rule (greedy; ``threshold=`` overrides the exported cutoff). Any gen
    length and block length: the policy's inputs do not depend on them."""
    policy, manifest = load_policy(folder, manifest)
    policy = policy.to(generator.adapter.device)
    default = float(manifest.get("threshold", 0.5))
    mask_id = generator.adapter.ids.mask

    def make(config, explicit: dict) -> PolicyRule:
        return PolicyRule(policy, mask_id, mode="greedy", threshold=float(explicit.get("threshold", default)))

    generator.rules["policy"] = make
