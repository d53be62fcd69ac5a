"""Training the joint sampler: windows of exact sequential trajectories, targets from the frozen base on the fly.

A trajectory recorded one token per full forward (``rule=marginal k=1``: sequential by lowest entropy) gives the
exact states ``x_s = where(order < s, tokens, MASK)`` (:func:`~dparallel.data.trajectory.state_at`). An example is
a (record, step s) pair; its window is the block of the position committed at s, and it can be unrolled to depth
``m = min(K, last step of the block - s)`` (the window must still hold masks after the d-th reveal).

For a batch the depth d ~ U{1..K} is drawn once (seeded); the sampler starts from the base's hidden states on x_s,
reads the window of x_{s+1} .. x_{s+d} (each one more trajectory token revealed) and its logits at depth d are
matched to the frozen base's own logits on x_{s+d}:

    loss = mean over positions masked in x_{s+d} of KL(p_base(. | x_{s+d}) || p_sampler)   (forward KL)

with gradients through the d unrolled sampler calls. Both base forwards run in one [2B, L] call under no_grad.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from dparallel.core.errors import require
from dparallel.data.trajectory import state_at

SEQUENTIAL_HINT = "record with decode.rule=marginal decode.k=1 decode.eot_stop=none decode.cache=none"


def load_sequential_records(path: str, max_records: int | None) -> tuple[list[dict], dict]:
    """Trajectories (prompt_ids, tokens, order) that commit exactly one token per step, and their manifest."""
    from dparallel.data.trajectory import read_manifest, select_records

    def check(r: dict) -> None:
        check_sequential(r["order"], int(r["steps"]), path)

    hint = f"run `dparallel record ... {SEQUENTIAL_HINT}` first"
    records = select_records(path, ("prompt_ids", "tokens", "order"), hint, max_records=max_records, check=check)
    return [{k: v.astype(np.int64) for k, v in r.items()} for r in records], read_manifest(path)


def check_sequential(order, steps: int, where: str) -> None:
    """Refuse a trajectory that commits several tokens in one step (its intermediate states are not exact)."""
    order = np.asarray(order)
    require(
        steps == order.size and np.array_equal(np.sort(order), np.arange(order.size)),
        f"{where} is not a sequential trajectory (one token per forward): {SEQUENTIAL_HINT}",
    )


def windows_of(record: dict, block_length: int, depth: int) -> np.ndarray:
    """[N, 3] rows (step s, window start, max depth m >= 1) of one sequential record (see the module docstring)."""
    order, g, w = record["order"], record["order"].size, block_length
    require(g % w == 0, f"joint.block_length={w} does not divide the records' canvas of {g}")
    position = np.argsort(order)  # position committed at step s (one per step)
    start = (position // w) * w  # [G] window start of step s
    last = order.reshape(-1, w).max(axis=1)[start // w]  # the block's last step
    steps = np.arange(g)
    m = np.minimum(depth, last - steps)
    keep = m >= 1
    return np.stack([steps[keep], start[keep], m[keep]], axis=1)


class Windows:
    """Every example window of a record list: ``index`` [N, 4] (record, step, window start, max depth)."""

    def __init__(self, records: Sequence[dict], block_length: int, depth: int):
        self.records, self.block_length, self.depth = list(records), block_length, depth
        parts = [
            np.concatenate([np.full((len(w), 1), i), w], axis=1)
            for i, r in enumerate(self.records)
            if len(w := windows_of(r, block_length, depth))
        ]
        self.index = np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, rows: np.ndarray, d: int, mask_id: int, pad_id: int) -> dict[str, torch.Tensor]:
        """Tensors of the windows ``rows`` (indices into ``index``) unrolled to depth ``d``:

        x [B, L] the left-padded canvas (prompt, state x_s); attention_mask [B, L]; target [B, L] the canvas at
        x_{s+d}; columns [B, W] the window's canvas positions; states [B, d, W] the window at x_{s+1} .. x_{s+d}.
        """
        picked = self.index[rows]
        prompts = [self.records[i]["prompt_ids"] for i in picked[:, 0]]
        width, w = max(len(p) for p in prompts), self.block_length
        g = self.records[picked[0, 0]]["tokens"].size
        x = np.full((len(picked), width + g), pad_id, dtype=np.int64)
        attn = np.zeros_like(x)
        target, states = x.copy(), np.zeros((len(picked), d, w), dtype=np.int64)
        for b, ((i, s, start, _), prompt) in enumerate(zip(picked, prompts)):
            r = self.records[i]
            attn[b, width - len(prompt) :] = 1
            for canvas in (x, target):
                canvas[b, width - len(prompt) : width] = prompt
            x[b, width:] = state_at(r["tokens"], r["order"], s, mask_id)
            target[b, width:] = state_at(r["tokens"], r["order"], s + d, mask_id)
            for j in range(d):
                states[b, j] = state_at(r["tokens"], r["order"], s + j + 1, mask_id)[start : start + w]
        columns = width + picked[:, 2:3] + np.arange(w)[None, :]
        out = {"x": x, "attention_mask": attn, "target": target, "columns": columns, "states": states}
        return {k: torch.from_numpy(v) for k, v in out.items()}


class WindowBatches(IterableDataset):
    """Endless batches: batch i draws its depth d ~ U{1..K} and ``batch_size`` windows with m >= d, from a generator
    seeded by (seed, i, rank), so a resumed run (``start_batch``) sees exactly the batches it would have seen."""

    def __init__(self, windows: Windows, batch_size: int, mask_id: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world: int = 1, start_batch: int = 0):  # fmt: skip
        require(len(windows) > 0, "no trajectory windows to train the joint sampler on")
        self.windows, self.batch_size, self.mask_id, self.pad_id = windows, batch_size, mask_id, pad_id
        self.seed, self.rank, self.world, self.start_batch = seed, rank, world, start_batch

    def draw(self, i: int) -> tuple[np.ndarray, int]:
        """(window rows, depth) of batch ``i`` of this rank."""
        rng = np.random.default_rng([self.seed, i, self.rank, self.world])
        d = int(rng.integers(1, self.windows.depth + 1))
        eligible = np.flatnonzero(self.windows.index[:, 3] >= d)
        return rng.choice(eligible, size=self.batch_size, replace=len(eligible) < self.batch_size), d

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        i = self.start_batch
        while True:
            rows, d = self.draw(i)
            yield self.windows.batch(rows, d, self.mask_id, self.pad_id)
            i += 1


def position_kl(target: torch.Tensor, logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)) per position [B, W] from [B, W, V] logits, in float32. The mask token
    is excluded from both distributions (the engine never proposes it)."""
    target, logits = target.float().clone(), logits.float().clone()
    target[..., mask_id] = float("-inf")
    logits[..., mask_id] = float("-inf")
    log_p, log_q = target.log_softmax(-1), logits.log_softmax(-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)  # 0 log 0 = 0


def masked_kl(target: torch.Tensor, logits: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Mean over ``masked`` [B, W] positions of :func:`position_kl`."""
    return position_kl(target, logits, mask_id)[masked].mean()
