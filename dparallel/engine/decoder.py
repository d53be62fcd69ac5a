"""The decoding loop: semi-autoregressive blocks over a masked canvas, one rule choosing commits per step.

Semantics follow LLaDA's reference ``generate`` exactly for the ``topk`` rule (same schedule, same Gumbel-max in
float64 over the whole sequence, same ``low_confidence``/``random`` remasking, ``cfg_scale``, ``logits_eos_inf`` and
``confidence_eos_eot_inf``), and the other rules swap only the selection step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dparallel.adapters.base import ModelAdapter
from dparallel.core.errors import require
from dparallel.engine.cache import ContextCache, build_cache
from dparallel.engine.config import DecodeConfig, DecodeStats
from dparallel.engine.rules import (
    NEG_INF,
    Proposal,
    Rule,
    StepContext,
    build_rule,
    forbid_proposals,
    token_statistics,
)


@dataclass
class Canvas:
    """A left-padded batch: x [B, P + G] (prompt, then G masks), attention_mask [B, P + G], prompt width P."""

    x: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    order: torch.Tensor = field(default=None)  # [B, G] step at which each canvas position was committed


def build_canvas(prompts: list[list[int]], gen_length: int, mask_id: int, pad_id: int, device) -> Canvas:
    """Left-pad prompts to a common width P and append ``gen_length`` masks."""
    require(len(prompts) > 0 and all(len(p) > 0 for p in prompts), "every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    x = torch.full((len(prompts), width + gen_length), mask_id, dtype=torch.long)
    attn = torch.ones_like(x)
    for i, p in enumerate(prompts):
        x[i, : width - len(p)] = pad_id
        attn[i, : width - len(p)] = 0
        x[i, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
    order = torch.full((len(prompts), gen_length), -1, dtype=torch.long)
    return Canvas(x.to(device), attn.to(device), width, order.to(device))


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64 exactly as LLaDA: exp(logits) / (-log u)^T, argmax of which samples at temperature T."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(u)) ** temperature


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None]


def _emit_step(
    on_step: StepCallback,
    call: int,
    canvas: Canvas,
    logits: torch.Tensor,
    first: int,
    nfe: torch.Tensor,
    active: torch.Tensor,
) -> None:
    """Argmax and :func:`token_statistics` over the answer canvas (where the forward covered it) for
    ``Decoder.run``; positions the forward did not cover keep their token and get statistics 0."""
    width = canvas.prompt_width
    tokens = canvas.x[:, width:].clone()
    lo, hi = max(first, width), first + logits.shape[1]
    part = logits[:, lo - first : hi - first]
    tokens[:, lo - width : hi - width] = part.argmax(dim=-1)
    stats = {}
    for name, value in token_statistics(part).items():
        stats[name] = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        stats[name][:, lo - width : hi - width] = value
    on_step(call, nfe.masked_fill(~active, -1), tokens, stats)


def _align_hidden(hidden: torch.Tensor, span: int, first: int, length: int, lead: int = 0) -> torch.Tensor:
    """The captured hidden states [B, S', H] cut to the ``span`` logits rows starting at canvas position ``first``:
    a full-canvas forward (no cache, or a cache refresh) covers all ``length`` positions, a cached step only its
    query span, which starts ``lead`` positions before ``first`` (1 for a shifted family, see ContextCache)."""
    start = first if hidden.shape[1] == length else lead
    return hidden[:, start : start + span]


class Decoder:
    """Runs one decoding rule over batches of prompts with a model adapter."""

    def __init__(self, adapter: ModelAdapter, config: DecodeConfig, rule: Rule | None = None):
        config.validate()
        self.adapter, self.config = adapter, config
        self.rule = rule or build_rule(
            config.rule,
            steps=config.steps or config.gen_length,
            num_blocks=config.num_blocks,
            threshold=config.threshold,
            factor=config.factor,
            k=config.k,
            entropy_budget=config.entropy_budget,
            factor_mode=config.factor_mode,
            topk_ties=config.topk_ties,
        )

    # ---- one model call ------------------------------------------------------------------------------------
    def _logits(self, canvas: Canvas, prompt_positions: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [B, L, V], with classifier-free guidance when cfg_scale > 0."""
        x, attn = canvas.x, canvas.attention_mask
        if self.config.cfg_scale <= 0:
            return self.adapter.logits(x, attn)
        unconditional = x.masked_fill(prompt_positions, self.adapter.ids.mask)
        both = self.adapter.logits(torch.cat([x, unconditional]), torch.cat([attn, attn]))
        cond, uncond = both.chunk(2)
        return uncond + (self.config.cfg_scale + 1) * (cond - uncond)

    def _propose(self, logits: torch.Tensor, x: torch.Tensor, masked: torch.Tensor, gen) -> tuple:
        """Candidate tokens [B, L] and their confidence [B, L] (-inf where not masked), LLaDA's way."""
        cfg, ids = self.config, self.adapter.ids
        # In place, as LLaDA edits its logits (no [B, L, V] copy per step); rules and features see the same logits.
        forbid_proposals(logits, ids.mask, ids.eos if cfg.logits_eos_inf else None)
        tokens = add_gumbel_noise(logits, cfg.temperature, gen).argmax(dim=-1)
        if cfg.remasking == "random":
            conf = torch.rand(tokens.shape, dtype=torch.float32, device=x.device, generator=gen)
        else:
            conf_logits = logits.float()
            if cfg.confidence_eos_eot_inf:
                # LLaDA zeroes EoT's probability before the softmax; at temperature 0 its noisy logits are the
                # logits themselves, so EOS is zeroed too. Reproduced as is so `topk` matches it token for token.
                conf_logits = conf_logits.clone()
                conf_logits[:, :, ids.eot] = NEG_INF
                if cfg.temperature == 0:
                    conf_logits[:, :, ids.eos] = NEG_INF
            conf = conf_logits.softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens, conf.masked_fill(~masked, NEG_INF)

    def _block_logits(
        self, canvas: Canvas, cache: ContextCache | None, prompt_positions: torch.Tensor, lo: int, hi: int, step: int
    ) -> tuple[torch.Tensor, int]:
        """Logits and the canvas position of their first row: the whole sequence without a cache (LLaDA's
        reference semantics, noise drawn over every position), the active block [lo, hi) with one."""
        if cache is None:
            return self._logits(canvas, prompt_positions), 0
        refresh = cache.refreshes and (
            step == 0 or (self.config.cache_refresh > 0 and step % self.config.cache_refresh == 0)
        )
        if refresh:
            return cache.refresh(canvas.x, canvas.attention_mask, lo, hi)[:, lo:hi], lo
        return cache.step(canvas.x, canvas.attention_mask, lo, hi)[:, : hi - lo], lo

    # ---- End-of-Text prediction (EoTP) ---------------------------------------------------------------------
    def _end_token(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = self.adapter.ids
        return (tokens == ids.eos) | (tokens == ids.eot)

    def _cut_at_proposed_eot(self, p: Proposal, commit: torch.Tensor) -> torch.Tensor:
        """``eot_stop=any``: in rows where some masked position of the window proposes EOS/EoT, commit the most
        confident such position and drop this step's commits after it (``_fill_after_eot`` fills the rest)."""
        proposed = self._end_token(p.tokens) & p.masked
        cut = p.confidence.masked_fill(~proposed, NEG_INF).argmax(dim=1, keepdim=True)  # [B, 1]
        pos = torch.arange(commit.shape[1], device=commit.device)[None, :]
        cut_commit = (commit & (pos < cut)) | (pos == cut)
        return torch.where(proposed.any(dim=1, keepdim=True), cut_commit, commit)

    def _fill_after_eot(self, canvas: Canvas, nfe: torch.Tensor) -> None:
        """Every still-masked answer position after a row's first committed EOS/EoT becomes EOS, committed at this
        step: those rows then have nothing left to decode in later blocks (no forwards, no NFE)."""
        answer = canvas.x[:, canvas.prompt_width :]  # a view: filled in place
        ended = self._end_token(answer)
        pos = torch.arange(answer.shape[1], device=answer.device)[None, :]
        first = torch.where(ended, pos, answer.shape[1]).min(dim=1, keepdim=True).values
        fill = (answer == self.adapter.ids.mask) & (pos > first)
        answer.masked_fill_(fill, self.adapter.ids.eos)
        canvas.order.copy_(torch.where(fill, nfe[:, None], canvas.order))

    # ---- the loop ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self, prompts: list[list[int]], on_step: StepCallback | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[DecodeStats]]:
        """Decode a batch. Returns the canvas tokens [B, G], the commit order [B, G] and per-row stats.

        ``on_step(step_total, row_steps, tokens, stats)``, when given, is called once per model call before
        that step's commits: ``row_steps`` [B] is the step index each row's ``order`` will record for this step
        (-1 for a row with nothing left to commit in the active block; ``cache=block`` gives such a row logits 0,
        so its tokens and statistics there say nothing), ``tokens`` [B, G] the argmax over the
        canvas and ``stats`` the :func:`~dparallel.engine.rules.token_statistics` of every position, each [B, G]
        (``conf``, ``entropy``, ``margin``; positions the forward did not cover, outside the active block under a
        cache, hold the current canvas token and statistics 0). Unused, it costs nothing.
        """
        cfg, mask_id = self.config, self.adapter.ids.mask
        device = self.adapter.device
        longest, limit = max(map(len, prompts), default=0), self.adapter.max_positions
        require(
            limit is None or longest + cfg.gen_length <= limit,
            f"a prompt of {longest} tokens + gen_length {cfg.gen_length} = {longest + cfg.gen_length} positions "
            f"exceed the model's max_position_embeddings {limit}: shorten the prompt or lower decode.gen_length",
        )
        canvas = build_canvas(prompts, cfg.gen_length, mask_id, self.adapter.ids.pad, device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        prompt_positions = canvas.x != mask_id  # LLaDA masks prompt *and* padding for the CFG pass
        cache = build_cache(self.adapter, cfg.cache, cfg.static_cache, cfg.cuda_graph) if cfg.cache != "none" else None
        nfe = torch.zeros(len(prompts), dtype=torch.long, device=device)
        self.rule.begin_run(len(prompts), device)
        start, calls = time.perf_counter(), 0
        for b in range(cfg.num_blocks):
            lo = canvas.prompt_width + b * cfg.block_length
            hi = lo + cfg.block_length
            self.rule.begin_block(canvas.x[:, lo:hi] == mask_id)
            for step in range(self.rule.steps_per_block(cfg.block_length)):
                in_block = canvas.x[:, lo:hi] == mask_id  # [B, W]
                active = in_block.any(dim=1)
                # A block ends as soon as no row has masks in it: a host sync, made every `sync_every` steps (a step
                # after the end commits nothing and counts no NFE, so later checks cost compute, not results).
                # `topk` without EoTP skips the check: its schedule empties every block exactly at its last step.
                check = (not self.rule.fixed_steps or cfg.eot_stop != "none") and step % cfg.sync_every == 0
                if check and not bool(active.any()):
                    break
                proposal, logits, first = self._proposal(canvas, cache, prompt_positions, (lo, hi), step, nfe, gen)
                if on_step is not None:
                    _emit_step(on_step, calls, canvas, logits, first, nfe, active)
                    calls += 1
                self._commit(canvas, proposal, lo, hi, nfe)
                nfe += active.long()
        out = canvas.x[:, canvas.prompt_width :]
        return out, canvas.order, self._stats(out, nfe, time.perf_counter() - start)

    def _proposal(self, canvas, cache, prompt_positions, window: tuple[int, int], step: int, nfe, gen):
        """One model call on the active block ``window`` = [lo, hi): the rule's :class:`Proposal` (argmax tokens,
        confidences and logits over the block, [B, W] / [B, W, V]), and the call's logits [B, S, V] from canvas
        position ``first``."""
        lo, hi = window
        mask_id = self.adapter.ids.mask
        masked = canvas.x == mask_id
        masked[:, hi:] = False  # LLaDA: positions after the block get -inf confidence
        # a forward hook on the LM head for rules over hidden states; other rules skip it entirely
        with self.adapter.capture_hidden() if self.rule.needs_hidden else nullcontext() as captured:
            logits, first = self._block_logits(canvas, cache, prompt_positions, lo, hi, step)
        hidden = None
        if captured is not None:
            lead = cache.lead if cache else 0
            hidden = _align_hidden(captured.hidden, logits.shape[1], first, canvas.x.shape[1], lead)
        span = slice(first, first + logits.shape[1])
        tokens, conf = self._propose(logits, canvas.x[:, span], masked[:, span], gen)
        w = slice(lo - first, hi - first)
        context = StepContext(
            canvas.x, canvas.attention_mask, canvas.prompt_width, logits, first, (lo, hi), nfe, gen, hidden, tokens
        )
        in_block = canvas.x[:, lo:hi] == mask_id  # [B, W]
        offset = lo - canvas.prompt_width
        return Proposal(tokens[:, w], conf[:, w], logits[:, w], in_block, step, offset, context), logits, first

    def _commit(self, canvas: Canvas, proposal: Proposal, lo: int, hi: int, nfe: torch.Tensor) -> None:
        """Write the rule's selection into the block and record each committed position's step."""
        commit = self.rule.select(proposal) & proposal.masked  # a rule may replace proposal.tokens (oracle)
        if self.config.eot_stop == "any":
            commit = self._cut_at_proposed_eot(proposal, commit)
        window = canvas.x[:, lo:hi]
        canvas.x[:, lo:hi] = torch.where(commit, proposal.tokens, window)
        order = canvas.order[:, lo - canvas.prompt_width : hi - canvas.prompt_width]
        # the row's own step count (its NFE so far), so a row's trajectory does not depend on its batch
        order.copy_(torch.where(commit, nfe[:, None], order))
        if self.config.eot_stop != "none":
            self._fill_after_eot(canvas, nfe)

    def _stats(self, out: torch.Tensor, nfe: torch.Tensor, wall: float) -> list[DecodeStats]:
        row_calls = self.rule.sampler_calls() or [0] * out.shape[0]
        return [
            DecodeStats(int(n), self.adapter.answer_length(row), wall / out.shape[0], int(c))
            for n, row, c in zip(nfe.tolist(), out.tolist(), row_calls)
        ]
