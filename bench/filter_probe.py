"""Does a Learn2PD filter that reads the base's last hidden states find more final tokens than the statistics head?

The ablation behind docs/methods/filter.md's "What a filter can know". Both heads get the same examples, the
(record, step) pairs of a features record (``filters/learn2pd.py``), the same split and the same 3,000 AdamW steps.
They are scored on the held-out records by recall at a fixed precision per family, the quantity a filter trades
for forwards: a head at precision 0.998 commits that share of the positions whose argmax is already final.

- ``stats``: the tiny recipe's head (``FilterHead`` over conf, entropy, margin, mask, step, repeat, clash).
- ``hidden``: the same head plus a per-position MLP over [LayerNorm(h_i), the position's 7 features], where h_i
  [H] is the frozen base's last hidden state at position i on the recorded state x_s (``state_at``), the input
  the logits (and so every statistic) are a function of. Logit = block head's logit + the per-position one.

    python bench/filter_probe.py runs/record-features/trajectories   # ~4 min on 2 cores; prints one line per head
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dparallel.adapters.load import load_adapter
from dparallel.data.suite import FAMILIES, TASK_FAMILY
from dparallel.data.trajectory import select_records, split_records, state_at
from dparallel.filters.learn2pd import block_starts, build_examples
from dparallel.filters.rule import FilterHead, block_features

FEATURES = ["conf", "entropy", "margin", "mask", "step", "repeat", "clash"]


@torch.no_grad()
def block_hidden(adapter, records: list[dict], w: int = 32) -> torch.Tensor:
    """[N, W, H] float16: the base's last hidden states at each example's active block, in build_examples' order."""
    out = []
    for r in records:
        tokens, order, prompt = np.asarray(r["tokens"]), np.asarray(r["order"]), np.asarray(r["prompt_ids"])
        steps = int(r["steps"])
        x = np.stack([np.concatenate([prompt, state_at(tokens, order, s, adapter.ids.mask)]) for s in range(steps)])
        x = torch.from_numpy(x).long()
        _, hidden = adapter.logits_and_hidden(x, torch.ones_like(x))  # [S, P + G, H]
        start = block_starts(order, steps, w)
        cols = torch.from_numpy(len(prompt) + start[:, None] + np.arange(w)[None, :])
        out.append(hidden[torch.arange(steps)[:, None], cols].half())
    return torch.cat(out)


class HiddenHead(nn.Module):
    """The statistics head plus a per-position MLP over the position's hidden state and its features."""

    def __init__(self, hidden_size: int, width: int = 128, w: int = 32):
        super().__init__()
        self.block, self.norm, self.w = FilterHead(w, FEATURES, 64), nn.LayerNorm(hidden_size), w
        self.position = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(hidden_size + len(FEATURES), width), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(width, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        per = x.view(x.shape[0], len(FEATURES), self.w).transpose(1, 2)  # [N, W * F] -> [N, W, F]
        return self.block(x) + self.position(torch.cat([self.norm(hidden.float()), per], -1)).squeeze(-1)


def fit(head: nn.Module, x: torch.Tensor, hidden: torch.Tensor | None, ex, steps: int = 3000) -> None:
    """BCE on masked positions, batch 256, AdamW lr 3e-3 (the tiny filter recipe's settings), seeded batches."""
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    head.train()
    for _ in range(steps):
        i = torch.randint(len(ex), (256,), generator=g)
        logits = head(x[i], hidden[i]) if hidden is not None else head(x[i])
        m = ex.masked[i]
        loss = F.binary_cross_entropy_with_logits(logits[m], ex.label[i][m].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()


def recall_at(prob: torch.Tensor, label: torch.Tensor, precision: float) -> float:
    """The largest recall whose top-scored prefix keeps ``precision`` (prob, label: 1-D over masked positions)."""
    hits = label[prob.argsort(descending=True)].float().cumsum(0)
    ok = (hits / torch.arange(1, len(hits) + 1) >= precision).nonzero()
    return float(hits[ok.max()] / label.sum()) if len(ok) else 0.0


def main(path: str) -> None:
    torch.manual_seed(0)
    keys = ("meta", "prompt_ids", "tokens", "order", "steps", "pred", "conf", "entropy", "margin")
    train, val = split_records(select_records(path, keys, "", arrays=False), 0.1, 0)
    adapter = load_adapter("builtin:tiny-teacher")
    ex = {n: build_examples(r, 32, ["conf", "entropy", "margin"], True) for n, r in (("train", train), ("val", val))}
    x = {n: block_features(e.stats, e.masked, e.step, FEATURES) for n, e in ex.items()}
    hidden = {"train": block_hidden(adapter, train), "val": block_hidden(adapter, val)}
    fam = np.repeat([TASK_FAMILY[r["meta"]["task"]] for r in val], [int(r["steps"]) for r in val])
    heads = {"stats": (FilterHead(32, FEATURES, 64), None), "hidden": (HiddenHead(hidden["val"].shape[-1]), hidden)}
    for name, (head, h) in heads.items():
        fit(head, x["train"], h["train"] if h else None, ex["train"])
        with torch.no_grad():
            prob = torch.sigmoid(head(x["val"], h["val"]) if h else head(x["val"]))
        cells = []
        for f in (*FAMILIES, "all"):
            rows = torch.from_numpy(fam == f) if f != "all" else torch.ones(len(fam), dtype=torch.bool)
            m = ex["val"].masked & rows[:, None]
            cells += [f"{f} {recall_at(prob[m], ex['val'].label[m], p):.3f}@{p}" for p in (0.995, 0.998, 0.999)]
        print(f"{name}: recall at precision | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
