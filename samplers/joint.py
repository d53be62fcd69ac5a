"""Approximate joint sampling: one extra decoder layer over the frozen dLLM's last hidden states lets a single full
forward commit k tokens that are sampled (approximately) jointly instead of independently.

After a full forward on the canvas x_s the base gives hidden states h0 [B, W, H] over the active block and the
marginal logits head(h0). Sub-step j = 0..k-1 commits the lowest-entropy masked position; before the next one the
sampler refreshes the block's distribution given the tokens just committed:

    h_{j+1} = h0 + RMSNorm_out(Layer(Linear_{2H->H}([RMSNorm_e(embed(x_{s,j+1})) ; RMSNorm_h(h_j)])))
    logits_{j+1} = head(h_{j+1})

``embed`` and ``head`` are the base's frozen token embedding and LM head, ``Layer`` one stock decoder layer of the
family (LlamaDecoderLayer for tiny/LLaDA, Qwen2DecoderLayer for Dream) used bidirectionally over the block with the
base's RoPE positions. The layer is recurrent (h_j is its own previous output) and ``RMSNorm_out`` starts at zero,
so an untrained sampler *is* the marginal baseline. Training: :mod:`dparallel.samplers.joint_data`.

A small error head reads the refreshed hidden states (detached: it never trains the layer) and predicts, per
position, the KL from the teacher's distribution to the layer's, KL(p_base(x_{s+j}) || softmax(logits_j)) in nats:
the error of sampling there from the layer instead of a full forward. ``kl_budget`` decoding stops a forward's
commits once their summed predicted KL would pass the budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dparallel.adapters.base import ModelAdapter, position_ids_from_mask
from dparallel.adapters.folder import read_manifest
from dparallel.core.errors import require
from dparallel.engine.components import load_weights
from dparallel.engine.rules import Marginal, Proposal, forbid_proposals

COMPONENT = "joint"


class JointSampler(nn.Module):
    """The sampler layer (the trainable part only: the base's embedding and head stay in the base)."""

    def __init__(self, layer_cls: type, rotary_cls: type, layer_config):
        super().__init__()
        h, eps = layer_config.hidden_size, layer_config.rms_norm_eps
        self.hidden_size = h
        self.norm_tokens = nn.RMSNorm(h, eps=eps)
        self.norm_hidden = nn.RMSNorm(h, eps=eps)
        self.fuse = nn.Linear(2 * h, h, bias=False)
        self.layer = layer_cls(layer_config, layer_idx=0)
        self.layer.self_attn.is_causal = False  # bidirectional: an explicit all-True mask, never causal
        self.rotary = rotary_cls(config=layer_config)  # inv_freq is a non-persistent buffer: not saved
        self.norm_out = nn.RMSNorm(h, eps=eps)
        nn.init.zeros_(self.norm_out.weight)  # h_1 = h0 at init: the sampler starts as the marginal
        self.error_head = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))

    def forward(
        self, token_emb: torch.Tensor, previous: torch.Tensor, base: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """token_emb, previous, base: [B, W, H]; positions [B, W] (RoPE). Returns the refreshed hidden [B, W, H]."""
        x = self.fuse(torch.cat([self.norm_tokens(token_emb), self.norm_hidden(previous)], dim=-1))
        b, w = positions.shape
        everyone = torch.ones(b, 1, w, w, dtype=torch.bool, device=x.device)  # every query sees the whole window
        x = self.layer(
            x, attention_mask=everyone, position_ids=positions, position_embeddings=self.rotary(x, positions)
        )
        return base + self.norm_out(x)

    def predicted_kl(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, W] the head's estimate (nats, >= 0) of KL(teacher || sampler) at each position of the refreshed
        ``hidden`` [B, W, H]; the input is detached, so the head's loss never moves the layer."""
        return nn.functional.softplus(self.error_head(hidden.detach())).squeeze(-1)


def new_sampler(adapter: ModelAdapter) -> JointSampler:
    """A sampler shaped like one layer of ``adapter``'s base, on its device."""
    layer_cls, rotary_cls, layer_config = adapter.stock_layer_class(adapter.model.config)
    return JointSampler(layer_cls, rotary_cls, layer_config).to(adapter.device)


def unroll(
    sampler: JointSampler,
    adapter: ModelAdapter,
    base: torch.Tensor,
    windows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Run the sampler over the window states ``windows`` [B, d, W] (state after 1..d more tokens) from the base
    hidden ``base`` [B, W, H]; returns the hidden states [B, W, H] at depth d (gradients flow through the chain)."""
    embed, h = adapter.input_embeddings(), base
    for j in range(windows.shape[1]):
        h = sampler(embed(windows[:, j]).to(base.dtype), h, base, positions)
    return h


class JointRule(Marginal):
    """``joint``: the k-per-forward schedule of :class:`~dparallel.engine.rules.Marginal`, with the sampler layer
    refreshing the window's logits after each sub-step's commit (k - 1 sampler calls per full forward)."""

    name = "joint"
    needs_hidden = True

    def __init__(
        self,
        sampler: JointSampler,
        adapter: ModelAdapter,
        k: int,
        temperature: float,
        eos_inf: bool,
        entropy_budget: float | None = None,
        kl_budget: float | None = None,
    ):
        super().__init__(k, entropy_budget)
        self.sampler, self.adapter = sampler, adapter
        self.temperature, self.eos_inf, self.kl_budget = temperature, eos_inf, kl_budget
        self.calls: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._kl: torch.Tensor | None = None  # [B] predicted KL committed in this forward

    @property
    def budgeted(self) -> bool:
        return self.budget is not None or self.kl_budget is not None

    def over_budget(self, entropy: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """Marginal's entropy budget, and the KL budget: the error head's predicted KL at each pick, summed over
        the forward (the first pick comes from the full forward itself: no error, nothing added)."""
        over = super().over_budget(entropy, pick)
        if self.kl_budget is None or self._previous is None:  # no KL budget, or the forward's own first pick
            return over
        # the head on the picked position only: [B, 1, H] (rows with no pick read position 0 and add nothing)
        index = pick.float().argmax(dim=1)[:, None, None].expand(-1, 1, self._previous.shape[-1])
        picked = self._previous.gather(1, index)
        added = self.sampler.predicted_kl(picked)[:, 0].float() * pick.any(dim=1)
        self._kl = added if self._kl is None else self._kl + added
        return over | (self._kl > self.kl_budget)

    def begin_run(self, batch: int, device: torch.device) -> None:
        self.calls = torch.zeros(batch, dtype=torch.long, device=device)

    def sampler_calls(self) -> list[int] | None:
        return None if self.calls is None else self.calls.tolist()

    def select(self, p: Proposal) -> torch.Tensor:
        require(
            p.context is not None and p.context.hidden is not None, "the joint rule needs the engine's hidden states"
        )
        self._previous, self._kl = None, None  # a new full forward: the chain restarts from the base hidden states
        return super().select(p)

    @torch.no_grad()
    def refresh(self, p: Proposal, window: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        ctx = p.context
        lo, hi = ctx.window
        # [B] rows with masks left in the block that still commit in this forward; the others ride along uncounted
        active = (window == self.adapter.ids.mask).any(dim=1) & rows
        base = ctx.hidden[:, lo - ctx.first : hi - ctx.first]  # [B, W, H]
        previous = base if self._previous is None else self._previous
        positions = position_ids_from_mask(ctx.attention_mask)[:, lo:hi]
        embed = self.adapter.input_embeddings()
        self._previous = self.sampler(embed(window).to(base.dtype), previous, base, positions)
        self.calls += active.long()
        ids = self.adapter.ids
        logits = self.adapter.output_head()(self._previous).float()
        return forbid_proposals(logits, ids.mask, ids.eos if self.eos_inf else None)  # as the engine's proposal

    def candidates(self, p: Proposal, logits: torch.Tensor) -> torch.Tensor:
        from dparallel.engine.decoder import add_gumbel_noise

        return add_gumbel_noise(logits, self.temperature, p.context.generator).argmax(dim=-1)


# ---- the method ---------------------------------------------------------------------------------------------


def window_inputs(adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One no-grad [2B, L] base forward over (x_s, x_{s+d}): the base hidden states on x_s's window [B, W, H], the
    target logits on x_{s+d}'s window [B, W, V], the window's RoPE positions [B, W] and its masks at x_{s+d}."""
    cols, attn = batch["columns"], batch["attention_mask"]
    with torch.no_grad():
        logits, hidden = adapter.logits_and_hidden(torch.cat([batch["x"], batch["target"]]), torch.cat([attn, attn]))
    b = cols.shape[0]
    base = hidden[:b].gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))
    target = logits[b:].gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))
    positions = position_ids_from_mask(attn).gather(1, cols)
    masked = batch["target"].gather(1, cols) == adapter.ids.mask
    return base, target, positions, masked


# ---- saving, loading, attaching -----------------------------------------------------------------------------


def load_sampler(folder: str | Path, adapter: ModelAdapter, manifest: dict | None = None) -> JointSampler:
    """The sampler layer of a component folder, shaped from (and placed like) ``adapter``'s base."""
    manifest = manifest if manifest is not None else read_manifest(str(folder))
    require(manifest.get("component") == COMPONENT, f"{folder} is not a joint component (no component: joint)")
    param = next(adapter.model.parameters())
    sampler = load_weights(folder, COMPONENT, new_sampler(adapter).float(), manifest)
    return sampler.to(param.device, param.dtype)


def attach_joint(generator, folder: str | Path, manifest: dict | None = None) -> None:
    """Give ``generator`` the ``joint`` rule of the component at ``folder``."""
    adapter = generator.adapter
    sampler = load_sampler(folder, adapter, manifest)

    def make(config, explicit: dict) -> JointRule:
        require(config.cfg_scale <= 0, "the joint rule does not support cfg_scale > 0: set cfg_scale=0")
        return JointRule(
            sampler,
            adapter,
            config.k,
            config.temperature,
            config.logits_eos_inf,
            config.entropy_budget,
            config.kl_budget,
        )

    generator.rules["joint"] = make
