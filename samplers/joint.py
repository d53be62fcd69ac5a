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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from dparallel.adapters import ModelAdapter, position_ids_from_mask, read_manifest
from dparallel.components import load_weights, save_component
from dparallel.engine.rules import Marginal, Proposal
from dparallel.errors import require
from dparallel.training import DParallelModule

COMPONENT = "joint"


@dataclass
class JointConfig:
    trajectories: str = "runs/record-sequential/trajectories"  # one token per forward (rule=marginal k=1)
    block_length: int = 32  # W: the window the sampler layer attends over (the decoding block)
    depth: int = 4  # K: the deepest unroll trained (k tokens per forward need k - 1 refreshes)
    k: int = 4  # tokens per full forward: the exported decoding default
    val_fraction: float = 0.1  # share held out for val/kl (of the records, or of the windows: see val_by)
    val_by: str = "records"  # records (whole trajectories held out) | windows (windows of the same trajectories)
    val_windows: int = 64  # held-out windows val/kl averages over
    eval_every: int = 25  # steps between val/kl evaluations (and at the start)
    max_records: int | None = None  # use at most this many trajectories (None: all)


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


def new_sampler(adapter: ModelAdapter) -> JointSampler:
    """A sampler shaped like one layer of ``adapter``'s base, on its device."""
    layer_cls, rotary_cls, layer_config = adapter.sampler_layer_class(adapter.model.config)
    return JointSampler(layer_cls, rotary_cls, layer_config).to(adapter.device)


def unroll(
    sampler: JointSampler,
    adapter: ModelAdapter,
    base: torch.Tensor,
    windows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Run the sampler over the window states ``windows`` [B, d, W] (state after 1..d more tokens) from the base
    hidden ``base`` [B, W, H]; returns the logits [B, W, V] at depth d (gradients flow through the whole chain)."""
    embed, h = adapter.input_embeddings(), base
    for j in range(windows.shape[1]):
        h = sampler(embed(windows[:, j]).to(base.dtype), h, base, positions)
    return adapter.output_head()(h)


class JointRule(Marginal):
    """``joint``: the k-per-forward schedule of :class:`~dparallel.engine.rules.Marginal`, with the sampler layer
    refreshing the window's logits after each sub-step's commit (k - 1 sampler calls per full forward)."""

    name = "joint"
    needs_hidden = True

    def __init__(self, sampler: JointSampler, adapter: ModelAdapter, k: int, temperature: float, eos_inf: bool):
        super().__init__(k)
        self.sampler, self.adapter = sampler, adapter
        self.temperature, self.eos_inf = temperature, eos_inf
        self.calls: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None

    def begin_run(self, batch: int, device: torch.device) -> None:
        self.calls = torch.zeros(batch, dtype=torch.long, device=device)

    def sampler_calls(self) -> list[int] | None:
        return None if self.calls is None else self.calls.tolist()

    def select(self, p: Proposal) -> torch.Tensor:
        require(
            p.context is not None and p.context.hidden is not None, "the joint rule needs the engine's hidden states"
        )
        self._previous = None  # a new full forward: the chain restarts from the base hidden states
        return super().select(p)

    @torch.no_grad()
    def refresh(self, p: Proposal, window: torch.Tensor) -> torch.Tensor | None:
        ctx = p.context
        lo, hi = ctx.window
        # [B] rows with masks left in the block; finished rows ride along uncounted (no host sync per sub-step)
        active = (window == self.adapter.ids.mask).any(dim=1)
        base = ctx.hidden[:, lo - ctx.first : hi - ctx.first]  # [B, W, H]
        previous = base if self._previous is None else self._previous
        positions = position_ids_from_mask(ctx.attention_mask)[:, lo:hi]
        embed = self.adapter.input_embeddings()
        self._previous = self.sampler(embed(window).to(base.dtype), previous, base, positions)
        self.calls += active.long()
        logits = self.adapter.output_head()(self._previous).float()
        logits[:, :, self.adapter.ids.mask] = float("-inf")  # as the engine's proposal: never the mask token
        if self.eos_inf:
            logits[:, :, self.adapter.ids.eos] = float("-inf")
        return logits

    def candidates(self, p: Proposal, logits: torch.Tensor) -> torch.Tensor:
        from dparallel.engine.sampler import add_gumbel_noise

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


def joint_loss(sampler: JointSampler, adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``kl``: the sampler's forward KL at the batch's depth (the loss, with gradients through the chain);
    ``kl_marginal``: the same KL for the base's own logits on x_s (no refresh), for reference."""
    from dparallel.samplers.joint_data import masked_kl

    base, target, positions, masked = window_inputs(adapter, batch)
    logits = unroll(sampler, adapter, base, batch["states"], positions)
    mask_id = adapter.ids.mask
    with torch.no_grad():
        marginal = masked_kl(target, adapter.output_head()(base), masked, mask_id)
    return {"kl": masked_kl(target, logits, masked, mask_id), "kl_marginal": marginal}


class JointSamplerModule(DParallelModule):
    """Trains the sampler layer over a frozen base. The base is not a registered submodule: checkpoints and the
    optimizer hold the sampler only (the base is moved to the training device at fit start)."""

    def __init__(self, cfg: DictConfig, adapter: ModelAdapter, sampler: JointSampler, val):
        super().__init__(cfg, adapter)
        del self.model  # keep the frozen base out of state_dict / DDP / the optimizer
        adapter.model.requires_grad_(False)
        self.sampler, self.val = sampler, val
        self.val_curve: list[tuple[int, float]] = []
        self.val_marginal: float | None = None

    def on_fit_start(self) -> None:
        self.adapter.model.to(self.device)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = joint_loss(self.sampler, self.adapter, batch)
        return out["kl"], {"kl_marginal": float(out["kl_marginal"]), "depth": float(batch["states"].shape[1])}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        every = max(1, self.cfg.joint.eval_every)
        if self.val is not None and self.global_step % every == 0:  # before this step's update: step 0 is the start
            self.log_val(self.global_step)
        return super().training_step(batch, batch_idx)

    def log_val(self, step: int) -> None:
        kl, marginal = self.held_out_kl()
        self.val_curve.append((step, kl))
        self.val_marginal = marginal
        self.log_dict({"val/kl": kl, "val/kl_marginal": marginal}, batch_size=1)

    @torch.no_grad()
    def held_out_kl(self) -> tuple[float, float]:
        """Mean KL over the held-out windows, each at its own depth min(K, m) (and the marginal's, no refresh)."""
        total, marginal, n = 0.0, 0.0, 0
        ids, device = self.adapter.ids, self.adapter.device
        for d in range(1, self.val.depth + 1):
            rows = np.flatnonzero(np.minimum(self.val.index[:, 3], self.val.depth) == d)
            for chunk in np.array_split(rows, max(1, len(rows) // 32)) if len(rows) else []:
                batch = {k: v.to(device) for k, v in self.val.batch(chunk, d, ids.mask, ids.pad).items()}
                out = joint_loss(self.sampler, self.adapter, batch)
                total, marginal, n = (
                    total + float(out["kl"]) * len(chunk),
                    marginal + float(out["kl_marginal"]) * len(chunk),
                    n + len(chunk),
                )
        return total / max(n, 1), marginal / max(n, 1)

    def on_train_end(self) -> None:
        if self.val is not None:
            kl, self.val_marginal = self.held_out_kl()
            self.val_curve.append((self.global_step, kl))

    def final_metrics(self) -> dict:
        if not self.val_curve:
            return {}
        return {
            "val_kl_start": self.val_curve[0][1],
            "val_kl_end": self.val_curve[-1][1],
            "val_kl_marginal": self.val_marginal,
            "val_kl_curve": [[s, k] for s, k in self.val_curve],
        }


def build(cfg: DictConfig, micro: int, start_batch: int):
    """The module over the recipe's frozen base and its loader of trajectory windows."""
    from dparallel.filters.learn2pd import split_records
    from dparallel.samplers.joint_data import WindowBatches, Windows, load_sequential_records
    from torch.utils.data import DataLoader

    from dparallel.adapters import load_adapter
    from dparallel.generator import pick_device
    from dparallel.methods import _rank_world

    j, rank_world = cfg.joint, _rank_world()
    require(j.depth >= 1 and 1 <= j.k <= j.depth + 1, f"joint.depth={j.depth}, joint.k={j.k}: need 1 <= k <= depth + 1")
    require(j.val_by in ("records", "windows"), f"joint.val_by={j.val_by!r}: use records or windows")
    records, manifest = load_sequential_records(j.trajectories, j.max_records)
    if j.val_by == "records":
        train_records, val_records = split_records(records, j.val_fraction, cfg.train.seed)
    else:
        train_records, val_records = records, records  # the windows are split below
    require(len(train_records) > 0, "joint.val_fraction leaves no trajectories to train on")
    device = pick_device(cfg.model.device)
    if device == "cuda":
        device = f"cuda:{int(__import__('os').environ.get('LOCAL_RANK', 0))}"
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    adapter = load_adapter(cfg.model.path, cfg.model.family, dtype, device, cfg.model.revision)
    teacher = manifest.get("teacher") or {}
    require(teacher.get("family") in (None, adapter.family), f"trajectories of a {teacher.get('family')} teacher")
    train_windows = Windows(train_records, j.block_length, j.depth)
    val = Windows(val_records, j.block_length, j.depth) if val_records else None
    if j.val_by == "windows":  # a seeded share of the windows is held out; training never draws them
        perm = np.random.default_rng(cfg.train.seed).permutation(len(train_windows))
        n_val = int(round(len(perm) * j.val_fraction))
        val.index, train_windows.index = train_windows.index[np.sort(perm[:n_val])], train_windows.index[perm[n_val:]]
    if val is not None and len(val) > j.val_windows:  # a fixed, seeded subset: the same windows every evaluation
        keep = np.random.default_rng(cfg.train.seed).choice(len(val), j.val_windows, replace=False)
        val.index = val.index[np.sort(keep)]
    torch.manual_seed(cfg.train.seed)
    sampler = new_sampler(adapter).float()
    ids = adapter.ids
    data = WindowBatches(train_windows, micro, ids.mask, ids.pad, cfg.train.seed, *rank_world, start_batch)
    n_params = sum(p.numel() for p in sampler.parameters())
    n_base = sum(p.numel() for p in adapter.model.parameters())
    print(
        f"joint: {len(train_records)} trajectories -> {len(train_windows)} windows, held out by {j.val_by}: "
        f"({len(val) if val else 0} windows); sampler {n_params} parameters ({n_params / n_base:.1%} of the base)",
        flush=True,
    )
    loader = DataLoader(data, batch_size=None, num_workers=cfg.train.num_workers)
    return JointSamplerModule(cfg, adapter, sampler, val if val is not None and len(val) else None), loader


# ---- saving, loading, attaching -----------------------------------------------------------------------------


def save(module, cfg: DictConfig, out: Path) -> None:
    """RUN_DIR/model: ``joint.safetensors`` (the sampler layer only) and ``dparallel.json`` (component ``joint``)."""
    j = cfg.joint
    fields = {"block_length": j.block_length, "depth": j.depth, "k": j.k, "metrics": module.final_metrics()}
    d = cfg.decode
    decoding = {"rule": "joint", "k": j.k, "gen_length": d.gen_length, "block_length": d.block_length}
    save_component(out, COMPONENT, module.sampler, module.adapter, cfg, fields, decoding)


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
        return JointRule(sampler, adapter, config.k, config.temperature, config.logits_eos_inf)

    generator.rules["joint"] = make
