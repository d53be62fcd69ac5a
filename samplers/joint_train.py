"""Training the joint sampler layer (method ``joint``): the KL between its unrolled block distribution and the
teacher's sequential one, over windows of recorded trajectories (:mod:`dparallel.samplers.joint_data`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from dparallel.adapters.base import ModelAdapter
from dparallel.core.errors import require
from dparallel.core.runtime import weights_dtype
from dparallel.engine.components import save_component
from dparallel.methods.base import DParallelModule
from dparallel.samplers.joint import COMPONENT, JointSampler, load_sampler, new_sampler, unroll, window_inputs


def joint_loss(sampler: JointSampler, adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``kl``: the sampler's forward KL at the batch's depth, mean over the masked positions (with gradients through
    the chain); ``error``: the error head's Huber loss against the KL at each window's pick (its own loss; the
    head reads detached hidden states); ``kl_marginal``: the KL of the base's own logits on x_s (no refresh)."""
    from dparallel.engine.rules import best_masked, forbid_proposals, token_statistics
    from dparallel.samplers.joint_data import masked_kl, position_kl

    base, target, positions, masked = window_inputs(adapter, batch)
    hidden = unroll(sampler, adapter, base, batch["states"], positions)
    mask_id = adapter.ids.mask
    logits = adapter.output_head()(hidden)
    kl = position_kl(target, logits, mask_id)  # [B, W]
    # The head is trained where decoding asks it: at each window's pick, the masked position of lowest refreshed
    # entropy (where a confidently wrong layer does its harm). Huber (1 nat): a pick's KL is heavy-tailed
    # (a wrong digit costs ~10 nats), and squared errors would dominate the gradient norm clipping shares.
    with torch.no_grad():
        proposal = forbid_proposals(logits.detach().float().clone(), mask_id)  # as the rule's refresh
        pick = best_masked(-token_statistics(proposal)["entropy"], masked)  # [B, W] one-hot per window
        marginal = masked_kl(target, adapter.output_head()(base), masked, mask_id)
    error = torch.nn.functional.smooth_l1_loss(sampler.predicted_kl(hidden)[pick].float(), kl.detach()[pick])
    return {"kl": kl[masked].mean(), "error": error, "kl_marginal": marginal}


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
        stats = {name: float(out[name].detach()) for name in ("kl", "error", "kl_marginal")}
        return out["kl"] + out["error"], {**stats, "depth": float(batch["states"].shape[1])}

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
    from torch.utils.data import DataLoader

    from dparallel.adapters.load import load_adapter
    from dparallel.core.runtime import pick_device, rank_world
    from dparallel.data.trajectory import split_records
    from dparallel.samplers.joint_data import WindowBatches, Windows, load_sequential_records

    j, (rank, world) = cfg.joint, rank_world()
    require(j.depth >= 1 and 1 <= j.k <= j.depth + 1, f"joint.depth={j.depth}, joint.k={j.k}: need 1 <= k <= depth + 1")
    require(j.val_by in ("records", "windows"), f"joint.val_by={j.val_by!r}: use records or windows")
    require(not j.head_only or j.init, "joint.head_only=true refits the error head of a trained layer: set joint.init")
    records, manifest = load_sequential_records(j.trajectories, j.max_records)
    if j.val_by == "records":
        train_records, val_records = split_records(records, j.val_fraction, cfg.train.seed)
    else:
        train_records, val_records = records, records  # the windows are split below
    require(len(train_records) > 0, "joint.val_fraction leaves no trajectories to train on")
    device = pick_device(cfg.model.device)
    if device == "cuda":
        device = f"cuda:{int(__import__('os').environ.get('LOCAL_RANK', 0))}"
    dtype = weights_dtype(cfg.model.dtype, device)  # the base is frozen: bfloat16 on a GPU
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
    sampler = new_sampler(adapter).float() if j.init is None else load_sampler(j.init, adapter).float().train()
    if j.head_only:
        sampler.requires_grad_(False)
        sampler.error_head.requires_grad_(True)
    ids = adapter.ids
    data = WindowBatches(train_windows, micro, ids.mask, ids.pad, cfg.train.seed, rank, world, start_batch)
    n_params = sum(p.numel() for p in sampler.parameters())
    n_base = sum(p.numel() for p in adapter.model.parameters())
    print(
        f"joint: {len(train_records)} trajectories -> {len(train_windows)} windows, held out by {j.val_by}: "
        f"({len(val) if val else 0} windows); sampler {n_params} parameters ({n_params / n_base:.1%} of the base)",
        flush=True,
    )
    loader = DataLoader(data, batch_size=None, num_workers=cfg.train.num_workers)
    return JointSamplerModule(cfg, adapter, sampler, val if val is not None and len(val) else None), loader


def save(module, cfg: DictConfig, out: Path) -> None:
    """RUN_DIR/model: ``joint.safetensors`` (the sampler layer only) and ``dparallel.json`` (component ``joint``)."""
    j = cfg.joint
    fields = {"block_length": j.block_length, "depth": j.depth, "k": j.k, "metrics": module.final_metrics()}
    d = cfg.decode
    decoding = {"rule": "joint", "k": j.k, "gen_length": d.gen_length, "block_length": d.block_length}
    save_component(out, COMPONENT, module.sampler, module.adapter, cfg, fields, decoding)
