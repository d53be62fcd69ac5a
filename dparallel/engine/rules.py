"""Decoding rules: given the model's proposal for the active block, choose which masked positions to commit.

Every rule sees a :class:`Proposal` restricted to the active block window ``[B, W]`` and returns a boolean
``[B, W]`` commit mask. Each rule commits at least one masked position per step in every row that still has
masked positions in the window, and never a position that is not masked, so a block finishes in at most ``W``
steps. Everything stays on the device: no host round-trip inside a rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dparallel.core.errors import DParallelError, require

NEG_INF = float("-inf")


@dataclass
class Proposal:
    """What the model proposes on the active window.

    tokens: [B, W] the candidate token per position (argmax, or Gumbel-max at temperature > 0)
    confidence: [B, W] the rule's score per position (probability of ``tokens``; random under
        ``remasking=random``); -inf where the position is not masked
    logits: [B, W, V] the raw logits (rules that need more than the confidence use them)
    masked: [B, W] True where the position is still masked
    step: index of this step inside the block (0-based)
    offset: answer-canvas index of the window's first position (block b of length W: b * W)

    A rule may replace ``tokens`` (the sampler commits ``tokens`` after ``select``): the oracle writes reference
    tokens there.

    context: what a rule that looks beyond the window needs (a policy over the whole canvas, a sampler layer over
    the model's hidden states): see :class:`StepContext`.
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    logits: torch.Tensor
    masked: torch.Tensor
    step: int
    offset: int = 0
    context: StepContext | None = None


@dataclass
class StepContext:
    """The whole decoding state at one step, for rules that see more than the active window.

    x: [B, L] the canvas (left padding, prompt, answer; masks where undecided) before this step's commits
    attention_mask: [B, L] 1 on real tokens
    prompt_width: P, the answer canvas is ``x[:, P:]``
    logits: [B, S, V] this forward's logits over canvas positions ``[first, first + S)`` (the whole canvas without
        a cache; the window (dual) or window + suffix (prefix) under a cache)
    first: canvas position of ``logits[:, 0]``
    window: (lo, hi) canvas positions of the active block
    nfe: [B] full forwards each row has taken part in so far (before this one)
    generator: the sampler's random generator (sampling rules draw from it, so a seed reproduces a run)
    hidden: the base model's last hidden states aligned with ``logits`` (``output_head(hidden) == logits``),
        recorded only when the rule sets ``needs_hidden`` (other rules pay nothing)
    proposed: [B, S] the candidate token per position of ``logits``' span (what ``Proposal.tokens`` holds on the
        window): rules that compare proposals across the canvas read it instead of another argmax over [B, S, V]
    """

    x: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    logits: torch.Tensor
    first: int
    window: tuple[int, int]
    nfe: torch.Tensor
    generator: torch.Generator | None = None
    hidden: torch.Tensor | None = None  # [B, S, H] last hidden states beside ``logits``; only for needs_hidden rules
    proposed: torch.Tensor | None = None


def token_statistics(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics of softmax(logits) at temperature 1, each [...] for logits [..., V]:

    - ``conf``: max probability p1 (the argmax's probability),
    - ``entropy``: -sum p log p in nats (``xlogy``: 0 log 0 = 0, so -inf logits are safe),
    - ``margin``: p1 - p2, the gap between the two most likely tokens.

    What recording stores as dense features and what the Learn2PD filter reads at decoding time: one function, so
    both see the same numbers."""
    probs = torch.softmax(logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values
    return {
        "conf": top2[..., 0],
        "entropy": -torch.special.xlogy(probs, probs).sum(-1),
        "margin": top2[..., 0] - top2[..., 1],
    }


def forbid_proposals(logits: torch.Tensor, mask_id: int, eos_id: int | None = None) -> torch.Tensor:
    """``logits`` [..., V] in place: the mask token (a block would never finish) and ``eos_id`` when given
    (``logits_eos_inf``) are never proposed. The engine's proposal and the joint sampler's refresh and training."""
    logits[..., mask_id] = NEG_INF
    if eos_id is not None:
        logits[..., eos_id] = NEG_INF
    return logits


STATISTICS = ("conf", "entropy", "margin")  # the keys of :func:`token_statistics`


CERTAIN = {"conf": 1.0, "entropy": 0.0, "margin": 1.0}  # what a committed position reads as (filter, policy)


CONFLICTS = ("repeat", "clash")  # features that read the block's tokens: see :func:`conflicts`


def conflicts(stats: dict[str, torch.Tensor], masked: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where committing a masked position's proposal would repeat a token of the block, each [N, W] bool.

    ``stats["proposed"]`` [N, W]: the token each position would commit (the argmax); ``stats["block"]`` [N, W]: the
    block's current tokens (read at committed positions only); ``stats["conf"]``: the proposals' max probability.

    - ``repeat``: the proposal equals a token already committed elsewhere in the block;
    - ``clash``: another masked position proposes the same token with a higher max probability (in float16; ties:
      neither).

    Parallel decoding fails by repetition (two positions of a permutation both taking the likeliest item);
    confidences alone cannot see it, the tokens can. Committed positions have no conflict."""
    missing = [k for k in ("proposed", "block", "conf") if k not in stats]
    require(not missing, f"the conflict features need {missing}: record again with record.features=true")
    # compared at float16, the precision records store: decoding (float32) and training then agree on near-ties
    proposed, conf = stats["proposed"], stats["conf"].half()
    current = torch.where(masked, proposed, stats["block"])  # [N, W]: what each position holds or would hold
    same = proposed[:, :, None] == current[:, None, :]  # [N, W(i), W(j)]: i's proposal is j's token
    same &= ~torch.eye(masked.shape[1], dtype=torch.bool, device=masked.device)
    repeat = (same & ~masked[:, None, :]).any(-1)
    clash = (same & masked[:, None, :] & (conf[:, None, :] > conf[:, :, None])).any(-1)
    return {"repeat": repeat & masked, "clash": clash & masked}


def rank_in_row(score: torch.Tensor) -> torch.Tensor:
    """[B, W] -> [B, W] rank of each entry when its row is sorted by descending score (0 = best)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return ranks


def best_masked(score: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[B, W] one-hot of the highest-scoring masked position per row (all False in rows with none masked)."""
    best = score.masked_fill(~masked, NEG_INF).argmax(dim=1, keepdim=True)
    return torch.zeros_like(masked).scatter_(1, best, True) & masked


class Rule:
    """Base class. ``fixed_steps`` rules run a known number of steps per block (no host sync to stop)."""

    name: ClassVar[str] = ""
    needs_hidden: ClassVar[bool] = False  # StepContext.hidden is filled (a sampler layer over the hidden states)

    def begin_run(self, batch: int, device: torch.device) -> None:
        """Called once per batch before its first block (rules that count their own calls reset them here)."""

    def sampler_calls(self) -> list[int] | None:
        """Per-row calls of a learned part beside the full forwards in the last run (None: the rule has none)."""
        return None

    def steps_per_block(self, block_length: int) -> int:
        """Upper bound on steps per block; every rule commits >= 1 token per step, so W always suffices."""
        return block_length

    @property
    def fixed_steps(self) -> bool:
        return False

    def begin_block(self, masked: torch.Tensor) -> None:
        """Called once per block with the block's mask state [B, W] before its first step."""

    def select(self, p: Proposal) -> torch.Tensor:
        raise NotImplementedError


class TopK(Rule):
    """LLaDA's schedule: a block's masks are split evenly over its steps (earlier steps take the remainder);
    each step commits that many of the highest-confidence masked positions."""

    name = "topk"

    def __init__(self, steps: int, num_blocks: int, ties: str = "lowest_index"):
        require(steps % num_blocks == 0, f"steps={steps} must be a multiple of the number of blocks {num_blocks}")
        self.steps = steps // num_blocks
        self.ties = ties
        self.schedule: torch.Tensor | None = None

    def steps_per_block(self, block_length: int) -> int:
        return self.steps

    @property
    def fixed_steps(self) -> bool:
        return True

    def begin_block(self, masked: torch.Tensor) -> None:
        # schedule: [B, steps]; base = n // steps, the first n % steps steps take one more (LLaDA's rule).
        n = masked.sum(dim=1, keepdim=True)
        extra = torch.arange(self.steps, device=masked.device)[None, :] < (n % self.steps)
        self.schedule = n // self.steps + extra.long()

    def select(self, p: Proposal) -> torch.Tensor:
        k = self.schedule[:, p.step : p.step + 1]
        # rank masked positions only (an unmasked score must not use up k)
        conf = p.confidence.masked_fill(~p.masked, NEG_INF)
        if self.ties == "reference" and p.context is not None:
            return reference_topk(conf, k, p.context) & p.masked
        return (rank_in_row(conf) < k) & p.masked  # equal scores: lowest index first, no host sync


def reference_topk(conf: torch.Tensor, k: torch.Tensor, context: StepContext) -> torch.Tensor:
    """LLaDA's selection verbatim. conf: [B, W] (-inf off the masked positions), k: [B, 1]. Per row, ``torch.topk``
    over the whole sequence row [L] (-inf outside the window) with that row's k, as LLaDA's ``generate`` calls it:
    torch.topk orders equal values by its own rule (it depends on the row's length and the device), and a trained
    model's float32 confidences saturate at exactly 1.0, so only the same call on the same row commits the same
    positions when confidences tie. Costs one host sync per step (each k as a Python int)."""
    lo, hi = context.window
    full = conf.new_full((conf.shape[0], context.x.shape[1]), NEG_INF)  # [B, L]
    full[:, lo:hi] = conf
    commit = torch.zeros_like(full, dtype=torch.bool)
    for row, count in enumerate(k.flatten().tolist()):
        commit[row, torch.topk(full[row], count).indices] = True
    return commit[:, lo:hi]


class Confidence(Rule):
    """Fast-dLLM's threshold: commit every masked position whose confidence is >= tau, and always the best one."""

    name = "confidence"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def select(self, p: Proposal) -> torch.Tensor:
        return ((p.confidence >= self.threshold) & p.masked) | best_masked(p.confidence, p.masked)


class LeftToRight(Rule):
    """Left to right through a confident run: commit the leftmost masked position, and the masked positions right
    after it while each one's confidence is >= tau (the first one below tau, or an already-committed position,
    ends the run). So a block is decoded left to right and skips ahead only through tokens the model is sure of;
    a later position is never committed before an earlier one. The rule for a model converted from an AR parent
    (ar2diff): with token shift the leftmost masked token is predicted from the clean context, as the parent did,
    while ``confidence`` lets a confident later position in first, which is where any-order mistakes come from
    (docs/methods/ar2diff.md)."""

    name = "ltr"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def select(self, p: Proposal) -> torch.Tensor:
        pos = torch.arange(p.masked.shape[1], device=p.masked.device)[None, :]  # [1, W]
        first = p.masked.long().argmax(dim=1, keepdim=True)  # [B, 1] leftmost masked (0 in a done row: & masked)
        passing = ((p.confidence >= self.threshold) & p.masked) | (pos == first)
        run = (passing | (pos < first)).long().cumprod(dim=1).bool()  # [B, W]: True up to the first failure
        return run & p.masked


class Entropy(Rule):
    """dParallel's rule: commit every masked position whose predictive entropy is below the threshold, and always
    the lowest-entropy one. Entropy in nats of softmax(logits) at temperature 1."""

    name = "entropy"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def select(self, p: Proposal) -> torch.Tensor:
        entropy = token_statistics(p.logits)["entropy"]  # [B, W] nats
        return ((entropy < self.threshold) & p.masked) | best_masked(-entropy, p.masked)


class Factor(Rule):
    """Fast-dLLM's factor rule: with masked confidences sorted c_1 >= c_2 >= ..., commit the longest prefix
    whose members all satisfy (n + 1)(1 - c_n) <= f; at least one position per step."""

    name = "factor"

    def __init__(self, factor: float, mode: str = "paper"):
        self.factor, self.mode = factor, mode

    def select(self, p: Proposal) -> torch.Tensor:
        conf = p.confidence.masked_fill(~p.masked, NEG_INF)
        ordered = conf.sort(dim=1, descending=True, stable=True).values  # [B, W]
        n = torch.arange(1, conf.shape[1] + 1, device=conf.device)[None, :]
        ok = ((n + 1) * (1 - ordered) <= self.factor) & torch.isfinite(ordered)
        keep = ok.long().cumprod(dim=1).sum(dim=1, keepdim=True).clamp(min=1)  # longest passing prefix, >= 1
        if self.mode == "fast_dllm":
            # Fast-dLLM's code (get_transfer_index_dynamic): when the first failing candidate is the last of the
            # N masked ones (keep == N - 1), it commits all N anyway.
            masked = p.masked.sum(dim=1, keepdim=True)
            keep = torch.where((keep == masked - 1) & (masked > 1), masked, keep)
        return (rank_in_row(conf) < keep) & p.masked


class Marginal(Rule):
    """k tokens per full forward: sub-step j = 0..k-1 commits the lowest-entropy masked position of the window and
    writes its candidate token. Without a refresh every sub-step reads the same (marginal) logits, so this is the
    k lowest-entropy positions sampled independently: the baseline the joint sampler refreshes
    (:meth:`refresh`). With k = 1 it is sequential decoding by entropy. Blocks of W masks take ceil(W / k) forwards.

    ``entropy_budget`` (nats) makes k a cap: a row stops committing in this forward at the first sub-step whose
    commit would lift the forward's summed entropy sum_j H_j above the budget (sub-step 0 always commits). Under a
    refresh H_j is conditional on the forward's earlier commits, so by the chain rule the sum *is* the entropy of
    the committed tokens' joint distribution, H(X_1..X_j) = sum_i H(X_i | X_<i); under marginal logits it is an
    upper bound on it (the EB-sampler's bound)."""

    name = "marginal"

    def __init__(self, k: int, entropy_budget: float | None = None):
        require(isinstance(k, int) and k >= 1, f"k={k} tokens per full forward must be an integer >= 1")
        self.k, self.budget = k, entropy_budget
        self._spent: torch.Tensor | None = None  # [B] nats of entropy committed in this forward

    @property
    def budgeted(self) -> bool:
        """True when a budget can end a forward before its k-th commit."""
        return self.budget is not None

    def over_budget(self, entropy: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """[B] True where adding this sub-step's ``pick`` [B, W] (its ``entropy`` [B, W]) passes the forward's budget;
        called once per sub-step, the first included (its entropy counts, though it always commits)."""
        spent = (entropy * pick).sum(dim=1)
        self._spent = spent if self._spent is None else self._spent + spent
        return self._spent > self.budget if self.budget is not None else torch.zeros_like(pick[:, 0])

    def refresh(self, p: Proposal, window: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """New window logits [B, W, V] after this forward's commits so far (``window`` [B, W]: the block with them
        written; ``rows`` [B]: the rows still committing in this forward); None keeps the marginal logits."""
        return None

    def candidates(self, p: Proposal, logits: torch.Tensor) -> torch.Tensor:
        """Candidate tokens [B, W] from refreshed logits (the first sub-step uses the sampler's ``p.tokens``)."""
        return logits.argmax(dim=-1)

    def select(self, p: Proposal) -> torch.Tensor:
        masked, commit = p.masked.clone(), torch.zeros_like(p.masked)
        entropy, candidates = token_statistics(p.logits)["entropy"], p.tokens
        window = p.context.x[:, p.context.window[0] : p.context.window[1]] if p.context is not None else None
        rows = torch.ones(masked.shape[0], dtype=torch.bool, device=masked.device)  # [B] still committing
        self._spent = None
        for j in range(self.k):
            pick = best_masked(-entropy, masked)  # [B, W] one-hot (empty in finished rows)
            if self.budgeted:
                over = self.over_budget(entropy, pick)
                rows = rows & ~over if j > 0 else rows  # a forward's first commit always goes
                pick = pick & rows[:, None]
            p.tokens = torch.where(pick, candidates, p.tokens)
            commit, masked = commit | pick, masked & ~pick
            # one host sync per sub-step, only under a budget: without it a forward whose rows have all closed
            # would still pay its remaining k - 1 - j refreshes (a sampler-layer call each under joint)
            if j + 1 == self.k or window is None or (self.budgeted and not bool(rows.any())):
                break
            logits = self.refresh(p, torch.where(commit, p.tokens, window), rows)
            if logits is not None:
                entropy, candidates = token_statistics(logits)["entropy"], self.candidates(p, logits)
        return commit


def build_rule(
    name: str,
    *,
    steps: int,
    num_blocks: int,
    threshold: float,
    factor: float,
    k: int = 1,
    entropy_budget: float | None = None,
    factor_mode: str = "paper",
    topk_ties: str = "lowest_index",
) -> Rule:
    """Construct a built-in rule from decoding options (components register further rules in the engine)."""
    if name == "topk":
        return TopK(steps, num_blocks, topk_ties)
    if name == "confidence":
        require(0.0 < threshold <= 1.0, f"confidence threshold {threshold} must be in (0, 1]")
        return Confidence(threshold)
    if name == "ltr":
        require(0.0 < threshold <= 1.0, f"ltr threshold {threshold} must be in (0, 1]")
        return LeftToRight(threshold)
    if name == "entropy":
        require(threshold > 0.0, f"entropy threshold {threshold} must be > 0 (nats)")
        return Entropy(threshold)
    if name == "factor":
        require(factor > 0.0 and math.isfinite(factor), f"factor {factor} must be a positive number")
        return Factor(factor, factor_mode)
    if name == "marginal":
        return Marginal(k, entropy_budget)
    raise DParallelError(
        f"unknown decoding rule {name!r}: built in are topk, confidence, ltr, entropy, factor, marginal; `filter` "
        "needs a filter component (dparallel.load(FILTER_FOLDER)), `oracle` a reference "
        "(dparallel.engine.oracle.OracleRule), `joint` a joint sampler (dparallel.load(JOINT_FOLDER))"
    )
