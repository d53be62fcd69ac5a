"""Learn2PD: a tiny learned filter that decides, per masked position of the active block, whether the dLLM's
current prediction is already final, so many tokens can be committed per forward; plus the "extremely greedy
parallel" oracle replay that shows the ceiling such a filter can reach.

Training data are trajectories recorded with ``record.features=true`` (dense ``pred``, ``conf``, ``entropy``,
``margin`` per step). For a record and a step ``s``, the active block is the block of the positions committed at
``s``; its example is

- features: per position of the block, the selected statistics at step ``s`` (``conf``: max probability, Learn2PD's
  only input; ``entropy``; ``margin``: top-1 minus top-2 probability; positions already committed before ``s`` read
  as certain: 1.0, 0.0, 1.0), optionally also the mask bit, the position in the block, the step inside the block
  and the conflicts of the proposals with the block's tokens (``repeat``, ``clash``: :func:`~dparallel.filters.rule.
  conflicts`, from ``pred[s]`` and the committed tokens),
- label: ``pred[s, i] == tokens[i]`` (the argmax already equals the teacher's final token), supervised on masked
  positions only.

The head is Learn2PD's 2-layer MLP over the flattened per-position features of the block -> ``W`` logits. The base
model stays frozen and is not needed while training: features are precomputed. At decoding time the ``filter``
rule commits every masked position with ``sigmoid(logit) > threshold``, plus the top-confidence masked one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import IterableDataset

from dparallel.adapters.base import SpecialIds
from dparallel.core.errors import require
from dparallel.engine.components import HeadOnlyAdapter, base_vocab_size, save_component
from dparallel.filters.rule import COMPONENT, STATISTICS, FilterHead, block_features, reads_tokens, statistics_of
from dparallel.methods.base import DParallelModule, epoch_order

# ---- the head and its features ------------------------------------------------------------------------------


# ---- decoding rules -----------------------------------------------------------------------------------------


# ---- training data ------------------------------------------------------------------------------------------


@dataclass
class FilterExamples:
    """Per-(record, step) examples of the active block: ``stats`` name -> [N, W] (the recorded statistics the head
    reads, float; ``proposed``/``block`` int when it reads conflicts), masked/label [N, W] bool, step [N]."""

    stats: dict[str, torch.Tensor]
    masked: torch.Tensor
    label: torch.Tensor
    step: torch.Tensor

    def __len__(self) -> int:
        return self.masked.shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        # masked first: Lightning reads the batch size off the first tensor
        fixed = {"masked": self.masked[index], "label": self.label[index], "step": self.step[index]}
        return {**fixed, **{k: v[index] for k, v in self.stats.items()}}


def record_examples(
    record: dict, block_length: int, stats: Sequence[str] = ("conf",), tokens_too: bool = False
) -> dict[str, np.ndarray]:
    """The examples of one trajectory record (see the module docstring). Arrays: each of ``stats`` [S, W] float32,
    masked and label [S, W] bool, step [S] int (the step inside the block); with ``tokens_too`` also proposed
    (the argmax) and block (the final tokens, what committed positions hold) [S, W] int64."""
    require(
        record.get("pred") is not None, "trajectories have no dense features: record them with record.features=true"
    )
    missing = [k for k in stats if record.get(k) is None]
    require(not missing, f"trajectories have no {missing} features: record again with record.features=true")
    tokens, order, pred = np.asarray(record["tokens"]), np.asarray(record["order"]), np.asarray(record["pred"])
    steps, g, w = int(record["steps"]), tokens.size, block_length
    require(g % w == 0, f"filter.block_length={w} does not divide the records' canvas of {g}")
    start = block_starts(order, steps, w)  # [S]
    cols = start[:, None] + np.arange(w)[None, :]  # [S, W]
    s = np.arange(steps)[:, None]
    block_order = order[cols]
    block_start_step = block_order.min(axis=1)  # the row's first step in this block
    proposed, final = pred[s, cols], tokens[cols]  # [S, W]: the argmax at step s, the block's final tokens
    tokens_at = {"proposed": proposed.astype(np.int64), "block": final.astype(np.int64)} if tokens_too else {}
    return {
        **{k: np.asarray(record[k], dtype=np.float32)[s, cols] for k in stats},
        **tokens_at,
        "masked": block_order >= s,  # state_at(tokens, order, s) == MASK, without materialising the canvas
        "label": proposed == final,
        "step": np.arange(steps) - block_start_step,
    }


def block_starts(order: np.ndarray, steps: int, block_length: int) -> np.ndarray:
    """[S] the first position of the block active at each step: the block of the first position committed there
    (EOS filling may reach further)."""
    g = order.size
    first = np.full(steps, g)
    np.minimum.at(first, order, np.arange(g))
    require((first < g).all(), "a recorded step commits nothing: the trajectory is malformed")
    return (first // block_length) * block_length


def build_examples(
    records: Sequence[dict], block_length: int, stats: Sequence[str] = ("conf",), tokens_too: bool = False
) -> FilterExamples:
    parts = [record_examples(r, block_length, stats, tokens_too) for r in records]
    require(len(parts) > 0, "no trajectory records to build filter examples from")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    tokens = ("proposed", "block") if tokens_too else ()
    return FilterExamples(
        stats={**{k: torch.from_numpy(cat[k]).float() for k in stats}, **{k: torch.from_numpy(cat[k]) for k in tokens}},
        masked=torch.from_numpy(cat["masked"]),
        label=torch.from_numpy(cat["label"]),
        step=torch.from_numpy(cat["step"]).long(),
    )


def load_feature_records(path: str, only_correct: bool, max_records: int | None) -> tuple[list[dict], dict]:
    """Records with dense features and the trajectory manifest."""
    from dparallel.data.trajectory import read_manifest, select_records

    hint = "run `dparallel record ... record.features=true` first"
    manifest = read_manifest(path) if Path(path).exists() else {}
    require(
        (manifest.get("record") or {}).get("features", True),
        f"{path} was recorded without dense features: record again with record.features=true",
    )
    keys = ("tokens", "order", "steps", "pred", *STATISTICS)
    return select_records(path, keys, hint, only_correct, max_records, arrays=False), manifest


class ExampleBatches(IterableDataset):
    """Endless batches: epoch e is a permutation seeded by (seed, e); rank r takes every world-th example; resume
    skips ``start_batch`` batches."""

    def __init__(self, examples: FilterExamples, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, start_batch: int = 0):  # fmt: skip
        require(len(examples) >= world * batch_size, f"{len(examples)} filter examples cannot fill one batch per rank")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.rank, self.world, self.start_batch = rank, world, start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.examples)
        per_epoch = (n // self.world) // self.batch_size
        epoch, offset = divmod(self.start_batch, per_epoch)
        while True:
            mine = epoch_order(n, self.seed, epoch, self.shuffle)[self.rank :: self.world]
            for b in range(offset, per_epoch):
                yield self.examples.batch(mine[b * self.batch_size : (b + 1) * self.batch_size])
            epoch, offset = epoch + 1, 0


# ---- the method ---------------------------------------------------------------------------------------------


def filter_loss(
    head: FilterHead, batch: dict[str, torch.Tensor], pos_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE over the masked positions of the batch (mean); returns (loss, logits [N, W])."""
    x = block_features(batch, batch["masked"], batch["step"], head.features)
    logits = head(x)
    m = batch["masked"]
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits[m], batch["label"][m].to(logits.dtype), pos_weight=weight)
    return loss, logits


@torch.no_grad()
def filter_metrics(head: FilterHead, examples: FilterExamples, threshold: float) -> dict[str, float]:
    """Precision, recall, false-positive rate and accuracy at ``threshold`` over the masked positions."""
    if len(examples) == 0:
        return {}
    param = next(head.parameters())
    x = block_features(examples.stats, examples.masked, examples.step, head.features)
    x = x.to(param.device, param.dtype)
    prob = torch.sigmoid(head(x).float()).cpu()
    m = examples.masked
    y, yhat = examples.label[m], prob[m] > threshold
    tp, fp = int((yhat & y).sum()), int((yhat & ~y).sum())
    fn, tn = int((~yhat & y).sum()), int((~yhat & ~y).sum())
    return {
        "precision": tp / max(tp + fp, 1),
        "recall": tp / max(tp + fn, 1),
        "fpr": fp / max(fp + tn, 1),
        "accuracy": (tp + tn) / max(tp + fp + fn + tn, 1),
        "positive_rate": (tp + fn) / max(tp + fp + fn + tn, 1),
    }


class Learn2PDModule(DParallelModule):
    """Trains the filter head; the base model is not loaded (``self.adapter`` only carries its ids)."""

    def __init__(self, cfg: DictConfig, adapter, head: FilterHead, val: FilterExamples | None, pos_weight: float):
        super().__init__(cfg, adapter)
        self.head, self.val, self.pos_weight = head, val, pos_weight
        self.val_metrics: dict[str, float] = {}

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logits = filter_loss(self.head, batch, self.pos_weight)
        m = batch["masked"]
        with torch.no_grad():
            hit = ((torch.sigmoid(logits[m]) > self.cfg.filter.threshold) == batch["label"][m]).float().mean()
        return loss, {"accuracy": float(hit), "positive_rate": float(batch["label"][m].float().mean())}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        step = self.global_step + 1  # the optimizer step this batch completes
        every = max(1, self.cfg.filter.eval_every)
        if self.val is not None and len(self.val) and (step % every == 0 or step >= self.cfg.train.max_steps):
            self.val_metrics = filter_metrics(self.head, self.val, self.cfg.filter.threshold)
            self.log_dict({f"val/{k}": v for k, v in self.val_metrics.items()}, batch_size=len(self.val))
        return loss


def build(cfg: DictConfig, micro: int, start_batch: int):
    from torch.utils.data import DataLoader

    from dparallel.core.runtime import rank_world

    f = cfg.filter
    head = FilterHead(f.block_length, list(f.features), f.hidden)  # fails on bad features before reading data
    records, manifest = load_feature_records(f.trajectories, f.only_correct_records, f.max_records)
    from dparallel.data.trajectory import split_records

    train_records, val_records = split_records(records, f.val_fraction, cfg.train.seed)
    require(len(train_records) > 0, "filter.val_fraction leaves no trajectories to train on")
    stats, tokens_too = statistics_of(head.features), reads_tokens(head.features)
    train_ex = build_examples(train_records, f.block_length, stats, tokens_too)
    val_ex = build_examples(val_records, f.block_length, stats, tokens_too) if val_records else None
    teacher = manifest.get("teacher") or {}
    family = cfg.model.family or teacher.get("family")
    require(family is not None, f"cannot tell the model family of {f.trajectories}: set model.family")
    require(
        teacher.get("family") in (None, family),
        f"trajectories of a {teacher.get('family')} teacher, model.family={family}",
    )
    ids = SpecialIds(**manifest["ids"])
    adapter = HeadOnlyAdapter(family, ids, base_vocab_size(cfg.model.path, cfg.model.revision), cfg.model.path)
    m = train_ex.masked
    n_pos = int((train_ex.label & m).sum())
    n_neg = int(m.sum()) - n_pos
    pos_weight = (n_neg / max(n_pos, 1)) if f.class_balance else f.pos_weight
    rank, world = rank_world()
    data = ExampleBatches(train_ex, micro, cfg.train.seed, f.shuffle, rank, world, start_batch)
    n_params = sum(p.numel() for p in head.parameters())
    epochs = cfg.train.max_steps * cfg.train.global_batch_size / len(train_ex)
    print(
        f"filter: {len(train_records)} trajectories -> {len(train_ex)} block examples "
        f"({n_pos / max(n_pos + n_neg, 1):.1%} of masked positions already final; pos_weight {pos_weight:.2f}), "
        f"{len(val_records)} held out; head {n_params} parameters; {cfg.train.max_steps} steps x "
        f"{cfg.train.global_batch_size} = {epochs:.2f} epochs",
        flush=True,
    )
    loader = DataLoader(data, batch_size=None, num_workers=cfg.train.num_workers)
    return Learn2PDModule(cfg, adapter, head, val_ex, pos_weight), loader


# ---- saving and loading the component -----------------------------------------------------------------------


def save(module: Learn2PDModule, cfg: DictConfig, out: Path) -> None:
    """RUN_DIR/model: ``filter.safetensors`` (the head) and ``dparallel.json`` (component ``filter``)."""
    head, f = module.head, cfg.filter
    if module.val is not None and len(module.val):
        module.val_metrics = filter_metrics(head, module.val, f.threshold)
    fields = {
        "block_length": head.block_length,
        "features": list(head.features),
        "hidden": head.hidden,
        "threshold": f.threshold,
        "metrics": module.val_metrics,
    }
    decoding = {"rule": "filter", "threshold": f.threshold, "block_length": head.block_length}
    save_component(out, COMPONENT, head, module.adapter, cfg, fields, decoding)
