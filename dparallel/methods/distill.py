"""Certainty-forcing distillation (dParallel): train a student on its teacher's own trajectories so that it is both
right and confident on the tokens of a block, which lets an entropy-threshold decoder commit many per forward.

From y = prompt + tokens (the teacher's final canvas) each row picks a random block of the response, masks it at
ratio p (mask M), masks everything after it with no loss and keeps earlier blocks clean. A second forward masks the
complement M̄ of the block instead, so every block token is supervised exactly once. Per pass the loss is the
cross-entropy over the masked block positions plus ``w`` times the entropy of softmax(logits / T) over the masked
positions whose argmax already equals the target (certainty is only forced where the student is right).

Normalisation: each term is a mean over that row's supervised (or correct) positions, and rows are averaged. At
batch size 1 this is the reference implementation's loss, and it does not change when per-device batch and
gradient accumulation are traded (the reference's masking was only correct at batch size 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import Dataset, Sampler

from dparallel.core.errors import DParallelError, require
from dparallel.core.runtime import weights_dtype
from dparallel.methods.base import DParallelModule, epoch_order

# ---- inputs -------------------------------------------------------------------------------------------------


def _ratio_range(mask_ratio: float | Sequence[float]) -> tuple[float, float]:
    spec = [float(mask_ratio)] if isinstance(mask_ratio, (int, float)) else [float(v) for v in mask_ratio]
    require(len(spec) in (1, 2), f"distill.mask_ratio={spec}: give [p] or [lo, hi]")
    lo, hi = spec[0], spec[-1]
    require(0.0 < lo <= hi <= 1.0, f"distill.mask_ratio={spec}: need 0 < lo <= hi <= 1")
    return lo, hi


def build_distill_inputs(
    prompt_ids: torch.Tensor,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mask_id: int,
    block_length: int,
    mask_ratio: float | Sequence[float] = 0.5,
    complementary: bool = True,
    mask_suffix: bool = True,
    full_response: bool = False,
    single_pass: bool = False,
    generator: torch.Generator | None = None,
    row_seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The two noisy inputs and their loss masks, each [B, P + G].

    prompt_ids: [B, P] left padded; tokens: [B, G] the teacher's canvas; attention_mask: [B, P] or [B, P + G]
    (1 = real token; positions outside it are never supervised). All randomness is drawn up front as one
    [B, 2 + 2G] uniform tensor (row i uses row i only), so a row's masks do not depend on the other rows.
    With ``row_seeds`` [B] each row draws from its own generator instead (the trainer passes a seed per record
    draw, so one process and any torchrun layout with the same global batch see the same masks).
    Returns (noisy_a, noisy_b, loss_mask_a, loss_mask_b); the b entries are None when ``single_pass``.
    """
    B, P = prompt_ids.shape
    G = tokens.shape[1]
    require(not (complementary and single_pass), "distill.single_pass needs distill.complementary=false")
    block = G if full_response else block_length
    require(block > 0 and G % block == 0, f"distill.block_length={block_length} does not divide the canvas of {G}")
    lo, hi = _ratio_range(mask_ratio)
    device = tokens.device
    gen_device = generator.device if generator is not None else device
    if row_seeds is None:
        u = torch.rand(B, 2 + 2 * G, generator=generator, device=gen_device).to(device)
    else:  # one generator per row: a row's masks depend on its seed alone (same under any DDP layout)
        gens = [torch.Generator().manual_seed(int(seed)) for seed in row_seeds.tolist()]
        u = torch.stack([torch.rand(2 + 2 * G, generator=g) for g in gens]).to(device)
    n_blocks = G // block
    start = ((u[:, 0] * n_blocks).long().clamp(max=n_blocks - 1) * block)[:, None]  # [B, 1]
    p = (lo + (hi - lo) * u[:, 1])[:, None]
    pos = torch.arange(G, device=device)[None, :]
    in_block = (pos >= start) & (pos < start + block)
    suffix = (pos >= start + block) & mask_suffix
    m_a = in_block & (u[:, 2 : 2 + G] < p)
    m_b = in_block & ~m_a if complementary else in_block & (u[:, 2 + G :] < p)
    if attention_mask is None:
        valid = torch.ones(B, G, dtype=torch.bool, device=device)
    else:
        valid = attention_mask[:, -G:].bool() if attention_mask.shape[1] == P + G else torch.ones_like(m_a)
    no_loss = torch.zeros(B, P, dtype=torch.bool, device=device)

    def one(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = torch.cat([prompt_ids, tokens.masked_fill(m | suffix, mask_id)], dim=1)
        return noisy, torch.cat([no_loss, m & valid], dim=1)

    noisy_a, loss_a = one(m_a)
    if single_pass:
        return noisy_a, None, loss_a, None
    noisy_b, loss_b = one(m_b)
    return noisy_a, noisy_b, loss_a, loss_b


# ---- loss ---------------------------------------------------------------------------------------------------


@dataclass
class PassTerms:
    """Per-row terms of one pass, each [B]: mean CE and mean entropy (over the row's supervised / gated
    positions; 0 where there are none), and the counts behind them. ``entropy_t1_sum`` is the summed entropy at
    temperature 1 over supervised positions (what the entropy decoding rule thresholds), for logging."""

    ce: torch.Tensor
    entropy: torch.Tensor
    n_masked: torch.Tensor
    n_correct: torch.Tensor
    entropy_t1_sum: torch.Tensor


def certainty_forcing_terms(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, temperature: float, correct_only: bool
) -> PassTerms:
    """logits: [B, L, V] aligned so logits[:, i] predicts targets[:, i]; targets, loss_mask: [B, L]."""
    B = targets.shape[0]
    rows, cols = loss_mask.nonzero(as_tuple=True)
    sel = logits[rows, cols].float()  # [N, V]: only the supervised positions, never the whole canvas
    tgt = targets[rows, cols]
    ce = F.cross_entropy(sel, tgt, reduction="none")
    correct = (sel.argmax(-1) == tgt).float()
    logq = torch.log_softmax(sel / temperature, dim=-1)
    h = -(logq.exp() * logq).sum(-1)
    gate = correct if correct_only else torch.ones_like(correct)

    def per_row(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(B, device=v.device, dtype=v.dtype).index_add(0, rows, v)

    n = per_row(torch.ones_like(ce))
    n_gate = per_row(gate)
    with torch.no_grad():
        logp = torch.log_softmax(sel, dim=-1)
        h1 = per_row(-(logp.exp() * logp).sum(-1))
    return PassTerms(
        ce=per_row(ce) / n.clamp(min=1),
        entropy=per_row(h * gate) / n_gate.clamp(min=1),
        n_masked=n,
        n_correct=per_row(correct),
        entropy_t1_sum=h1,
    )


class CertaintyForcingModule(DParallelModule):
    """dParallel's student. Batches (see :meth:`TrajectoryBatches.collate`): prompt_ids [B, P] (left padded),
    tokens [B, G], attention_mask [B, P + G]."""

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.cfg.distill
        prompt, tokens, attn = batch["prompt_ids"], batch["tokens"], batch["attention_mask"]
        inputs = build_distill_inputs(
            prompt, tokens, attn, self.adapter.ids.mask, d.block_length, list(d.mask_ratio),
            d.complementary, d.mask_suffix, d.full_response, d.single_pass,
            row_seeds=self.cfg.train.seed * 1_000_000_007 + batch["draw"],
        )  # fmt: skip
        targets = torch.cat([prompt, tokens], dim=1)
        ce = ent = 0.0
        n_masked = n_correct = h1 = 0.0
        for noisy, loss_mask in ((inputs[0], inputs[2]), (inputs[1], inputs[3])):
            if noisy is None:
                continue
            terms = certainty_forcing_terms(
                self.adapter.logits(noisy, attn), targets, loss_mask, d.temperature, d.correct_only
            )
            ce = ce + terms.ce.mean()
            ent = ent + terms.entropy.mean()
            n_masked = n_masked + terms.n_masked.sum()
            n_correct = n_correct + terms.n_correct.sum()
            h1 = h1 + terms.entropy_t1_sum.sum()
        loss = ce + d.entropy_weight * ent
        denom = max(float(n_masked), 1.0)
        return loss, {
            "ce": ce.detach(),
            "entropy": ent.detach(),
            "correct_frac": float(n_correct) / denom,
            "mean_entropy": float(h1) / denom,
        }


# ---- data ---------------------------------------------------------------------------------------------------


def load_records(
    path: str, only_correct: bool = True, max_records: int | None = None, balance_tasks: bool = False
) -> list[dict]:
    """Trajectory records (prompt_ids, tokens as int arrays) from a recorded folder; records the teacher got wrong
    are dropped when ``only_correct``; with ``balance_tasks`` every task's records repeat up to the largest task's
    count (:func:`~dparallel.data.trajectory.balance_records`)."""
    try:
        from dparallel.data.trajectory import balance_records, select_records
    except ImportError as e:
        raise DParallelError(
            f"cannot read trajectories: the trajectory reader dparallel.data.trajectory is missing ({e})"
        ) from None
    hint = "run `dparallel record` first or set distill.trajectories"
    records = select_records(path, ("prompt_ids", "tokens", "meta"), hint, only_correct, max_records, arrays=False)
    arrays = [{"prompt_ids": np.asarray(r["prompt_ids"]), "tokens": np.asarray(r["tokens"])} for r in records]
    if not balance_tasks:
        return arrays
    meta = [r["meta"] or {} for r in records]
    return balance_records(arrays, [str(m.get("task") or m.get("source")) for m in meta])


class TrajectoryBatches(Dataset):
    """Map-style dataset over in-memory trajectory records; :meth:`collate` left-pads prompts and stacks the
    canvases (all records share one canvas length G)."""

    def __init__(self, records: Sequence[dict], pad_id: int):
        require(len(records) > 0, "no trajectory records to train on")
        self.records, self.pad_id = list(records), pad_id
        lengths = {len(r["tokens"]) for r in self.records}
        require(len(lengths) == 1, f"trajectories have different canvas lengths {sorted(lengths)}: record them alike")
        self.gen_length = lengths.pop()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, draw: int) -> dict:
        # ``draw`` = epoch * n + index (see EpochSampler): which record, and which draw of it (seeds its masks).
        return {**self.records[draw % len(self.records)], "draw": draw}

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["prompt_ids"]) for r in items)
        prompts = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attn = torch.ones(len(items), width + self.gen_length, dtype=torch.long)
        for i, r in enumerate(items):
            n = len(r["prompt_ids"])
            require(len(r["tokens"]) == self.gen_length, "trajectories have different canvas lengths")
            if n:
                prompts[i, width - n :] = torch.as_tensor(np.asarray(r["prompt_ids"]), dtype=torch.long)
            attn[i, : width - n] = 0
        tokens = torch.as_tensor(np.stack([np.asarray(r["tokens"]) for r in items]), dtype=torch.long)
        draws = torch.tensor([r.get("draw", i) for i, r in enumerate(items)], dtype=torch.long)
        return {"prompt_ids": prompts, "tokens": tokens, "attention_mask": attn, "draw": draws}


class EpochSampler(Sampler[int]):
    """An endless stream of record draws ``epoch * n + index``: epoch e is a permutation seeded by (seed, e), rank r
    takes every world-th index (the tail that does not split evenly is dropped), and ``start`` skips draws already
    consumed (resume)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True, start: int = 0):
        require(n >= world, f"{n} trajectories cannot feed {world} ranks: record more")
        self.n, self.rank, self.world, self.seed, self.shuffle, self.start = n, rank, world, seed, shuffle, start

    def __iter__(self) -> Iterator[int]:
        per_rank = self.n // self.world
        epoch, offset = divmod(self.start, per_rank)
        while True:
            order = epoch_order(self.n, self.seed, epoch, self.shuffle)
            yield from (epoch * self.n + order[self.rank :: self.world][:per_rank][offset:]).tolist()
            epoch, offset = epoch + 1, 0


# ---- method entry points (registered in dparallel.methods) ---------------------------------------------------


def build(cfg: DictConfig, micro: int, start_batch: int):
    from torch.utils.data import DataLoader

    from dparallel.adapters.load import load_adapter
    from dparallel.core.runtime import rank_world
    from dparallel.methods.base import prepare_for_training

    d = cfg.distill
    _ratio_range(d.mask_ratio)  # fail on bad options before reading data or loading weights
    require(not (d.complementary and d.single_pass), "distill.single_pass needs distill.complementary=false")
    data_records = load_records(d.trajectories, d.only_correct_records, d.max_records, d.balance_tasks)
    adapter = load_adapter(
        cfg.model.path,
        family=cfg.model.family,
        dtype=weights_dtype(cfg.model.dtype, cfg.model.device, frozen=cfg.lora.enabled),
        revision=cfg.model.revision,
    )
    data = TrajectoryBatches(data_records, adapter.ids.pad)
    block = data.gen_length if d.full_response else d.block_length
    require(data.gen_length % block == 0, f"distill.block_length={block} does not divide the canvas {data.gen_length}")
    prepare_for_training(adapter, cfg)
    rank, world = rank_world()
    sampler = EpochSampler(len(data), rank, world, cfg.train.seed, d.shuffle, start=start_batch * micro)
    epochs = cfg.train.max_steps * cfg.train.global_batch_size / len(data)
    print(
        f"distill: {len(data)} trajectories (canvas {data.gen_length}); {cfg.train.max_steps} steps x "
        f"{cfg.train.global_batch_size} = {epochs:.2f} epochs",
        flush=True,
    )
    loader = DataLoader(
        data, batch_size=micro, sampler=sampler, collate_fn=data.collate, num_workers=cfg.train.num_workers
    )
    return CertaintyForcingModule(cfg, adapter), loader


def save(module: DParallelModule, cfg: DictConfig, out: Path) -> None:
    """The merged student (LoRA folded in) as a plain model folder."""
    from dparallel.adapters.folder import save_model_folder

    save_model_folder(module.adapter, out, dtype=cfg.distill.save_dtype, recipe=cfg)
