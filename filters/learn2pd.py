"""Learn2PD: a tiny learned filter that decides, per masked position of the active block, whether the dLLM's
current prediction is already final, so many tokens can be committed per forward; plus the "extremely greedy
parallel" oracle replay that shows the ceiling such a filter can reach.

Training data are trajectories recorded with ``record.features=true`` (dense ``pred``, ``conf``, ``entropy``,
``margin`` per step). For a record and a step ``s``, the active block is the block of the positions committed at
``s``; its example is

- features: per position of the block, the selected statistics at step ``s`` (``conf``: max probability, Learn2PD's
  only input; ``entropy``; ``margin``: top-1 minus top-2 probability; positions already committed before ``s`` read
  as certain: 1.0, 0.0, 1.0), optionally also the mask bit, the position in the block and the step inside the block,
- label: ``pred[s, i] == tokens[i]`` (the argmax already equals the teacher's final token), supervised on masked
  positions only.

The head is Learn2PD's 2-layer MLP over the flattened per-position features of the block -> ``W`` logits. The base
model stays frozen and is not needed while training: features are precomputed. At decoding time the ``filter``
rule commits every masked position with ``sigmoid(logit) > threshold``, plus the top-confidence masked one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import IterableDataset

from dparallel.adapters import ModelAdapter, SpecialIds, read_manifest
from dparallel.components import HeadOnlyAdapter, base_vocab_size, load_weights, save_component
from dparallel.engine.rules import Proposal, Rule, best_masked, token_statistics
from dparallel.errors import DParallelError, require
from dparallel.training import DParallelModule

STATISTICS = ("conf", "entropy", "margin")  # recorded per step (engine.rules.token_statistics)
FEATURES = (*STATISTICS, "mask", "position", "step")
CERTAIN = {"conf": 1.0, "entropy": 0.0, "margin": 1.0}  # what a committed position reads as
COMPONENT = "filter"


@dataclass
class FilterConfig:
    trajectories: str = "runs/record-features/trajectories"  # recorded with record.features=true
    block_length: int = 32  # W: the decoding block the filter sees (must divide the records' canvas)
    hidden: int = 64  # width of the MLP's hidden layer
    features: list[str] = field(default_factory=lambda: ["conf"])  # conf|entropy|margin|mask|position|step
    threshold: float = 0.96  # commit a masked position when sigmoid(logit) > threshold (saved as the default)
    class_balance: bool = False  # BCE pos_weight = negatives / positives of the training examples
    pos_weight: float = 1.0  # BCE pos_weight when class_balance is false
    val_fraction: float = 0.1  # records held out for precision / recall / false-positive rate
    eval_every: int = 50  # steps between held-out evaluations (and at the last step)
    only_correct_records: bool = False  # drop trajectories whose teacher answer was wrong
    max_records: int | None = None  # use at most this many trajectories (None: all)
    shuffle: bool = True  # reshuffle the examples every epoch


# ---- the head and its features ------------------------------------------------------------------------------


class FilterHead(nn.Module):
    """Learn2PD's filter: Linear(W * F -> hidden) -> ReLU -> Linear(hidden -> W), one logit per block position."""

    def __init__(self, block_length: int, features: Sequence[str] = ("conf",), hidden: int = 64):
        super().__init__()
        bad = [f for f in features if f not in FEATURES]
        require(not bad and len(features) > 0, f"filter.features={list(features)}: choose from {', '.join(FEATURES)}")
        self.block_length, self.features, self.hidden = block_length, tuple(features), hidden
        self.net = nn.Sequential(
            nn.Linear(block_length * len(features), hidden), nn.ReLU(), nn.Linear(hidden, block_length)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, W * F] (see :func:`block_features`) -> logits [N, W]."""
        return self.net(x)


def block_features(
    stats: dict[str, torch.Tensor], masked: torch.Tensor, step: torch.Tensor | int, features: Sequence[str]
) -> torch.Tensor:
    """The head's input [N, W * F] from the block's per-position statistics ``stats`` (``conf``/``entropy``/
    ``margin``, each [N, W]; only the ones ``features`` names are read), its mask state ``masked`` [N, W] and the
    step inside the block ``step`` ([N] or an int). Committed positions read as certain (:data:`CERTAIN`). Shared
    by training and decoding, so both see exactly the same features."""
    n, w = masked.shape
    parts = []
    for name in features:
        if name in STATISTICS:
            require(name in stats, f"filter feature {name!r} was not recorded: record again with record.features=true")
            parts.append(torch.where(masked, stats[name].float(), torch.tensor(CERTAIN[name], device=masked.device)))
        elif name == "mask":
            parts.append(masked.float())
        elif name == "position":
            parts.append((torch.arange(w, device=masked.device, dtype=torch.float32) / w).expand(n, w))
        elif name == "step":
            s = torch.as_tensor(step, device=masked.device, dtype=torch.float32).reshape(-1, 1)
            parts.append((s / w).expand(n, w))
        else:
            raise DParallelError(f"unknown filter feature {name!r}: choose from {', '.join(FEATURES)}")
    return torch.cat(parts, dim=1)


def statistics_of(features: Sequence[str]) -> list[str]:
    """The recorded statistics a feature list reads."""
    return [f for f in features if f in STATISTICS]


# ---- decoding rules -----------------------------------------------------------------------------------------


class FilterRule(Rule):
    """Learn2PD's decoder: commit masked positions whose ``sigmoid(filter) > threshold``, and always the
    top-confidence masked one (so every active row commits at least one token per step)."""

    name = "filter"

    def __init__(self, head: FilterHead, threshold: float):
        require(0.0 <= threshold < 1.0, f"filter threshold {threshold} must be in [0, 1)")
        self.head, self.threshold = head, threshold
        self.head_calls = 0

    def begin_block(self, masked: torch.Tensor) -> None:
        require(
            masked.shape[1] == self.head.block_length,
            f"this filter was trained for block_length={self.head.block_length}, not {masked.shape[1]}: "
            f"decode with block_length={self.head.block_length}",
        )

    def select(self, p: Proposal) -> torch.Tensor:
        param = next(self.head.parameters())
        x = block_features(token_statistics(p.logits), p.masked, p.step, self.head.features)
        prob = torch.sigmoid(self.head(x.to(param.device, param.dtype)).float())
        self.head_calls += 1
        return ((prob > self.threshold) & p.masked) | best_masked(p.confidence, p.masked)


class OracleRule(Rule):
    """Learn2PD's "extremely greedy parallel" replay against a reference canvas ``reference`` [B, G] (one row per
    prompt of the batch): commit every masked position of the block whose proposal equals the reference; when
    none does, commit the reference token at the top-confidence masked position (the stall guard). Its output is
    the reference; its NFE is the ceiling a perfect filter could reach on that reference."""

    name = "oracle"

    def __init__(self, reference: torch.Tensor):
        self.reference = torch.as_tensor(reference, dtype=torch.long)

    def select(self, p: Proposal) -> torch.Tensor:
        if self.reference.device != p.tokens.device:
            self.reference = self.reference.to(p.tokens.device)
        ref = self.reference[:, p.offset : p.offset + p.tokens.shape[1]]
        require(ref.shape == p.tokens.shape, f"oracle reference {tuple(self.reference.shape)} does not fit the batch")
        match = (p.tokens == ref) & p.masked
        guard = best_masked(p.confidence, p.masked) & ~match.any(dim=1, keepdim=True)
        p.tokens = torch.where(guard, ref, p.tokens)
        return match | guard


def oracle_decode(adapter: ModelAdapter, prompts: list[list[int]], reference, config):
    """Replay ``reference`` [B, G] with the oracle rule; returns the sampler's (tokens, order, stats)."""
    from dparallel.engine.sampler import Sampler

    return Sampler(adapter, config, rule=OracleRule(reference)).run(prompts)


# ---- training data ------------------------------------------------------------------------------------------


@dataclass
class FilterExamples:
    """Per-(record, step) examples of the active block: ``stats`` name -> [N, W] float (the recorded statistics the
    head reads), masked/label [N, W] bool, step [N]."""

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


def record_examples(record: dict, block_length: int, stats: Sequence[str] = ("conf",)) -> dict[str, np.ndarray]:
    """The examples of one trajectory record (see the module docstring). Arrays: each of ``stats`` [S, W] float32,
    masked and label [S, W] bool, step [S] int (the step inside the block)."""
    require(
        record.get("pred") is not None, "trajectories have no dense features: record them with record.features=true"
    )
    missing = [k for k in stats if record.get(k) is None]
    require(not missing, f"trajectories have no {missing} features: record again with record.features=true")
    tokens, order, pred = np.asarray(record["tokens"]), np.asarray(record["order"]), np.asarray(record["pred"])
    steps, g, w = int(record["steps"]), tokens.size, block_length
    require(g % w == 0, f"filter.block_length={w} does not divide the records' canvas of {g}")
    pos = np.arange(g)
    # the active block of step s: the block of the first position committed at s (EOS filling may reach further)
    first = np.full(steps, g)
    np.minimum.at(first, order, pos)
    require((first < g).all(), "a recorded step commits nothing: the trajectory is malformed")
    start = (first // w) * w  # [S]
    cols = start[:, None] + np.arange(w)[None, :]  # [S, W]
    s = np.arange(steps)[:, None]
    block_order = order[cols]
    block_start_step = block_order.min(axis=1)  # the row's first step in this block
    return {
        **{k: np.asarray(record[k], dtype=np.float32)[s, cols] for k in stats},
        "masked": block_order >= s,  # state_at(tokens, order, s) == MASK, without materialising the canvas
        "label": pred[s, cols] == tokens[cols],
        "step": np.arange(steps) - block_start_step,
    }


def build_examples(records: Sequence[dict], block_length: int, stats: Sequence[str] = ("conf",)) -> FilterExamples:
    parts = [record_examples(r, block_length, stats) for r in records]
    require(len(parts) > 0, "no trajectory records to build filter examples from")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return FilterExamples(
        stats={k: torch.from_numpy(cat[k]).float() for k in stats},
        masked=torch.from_numpy(cat["masked"]),
        label=torch.from_numpy(cat["label"]),
        step=torch.from_numpy(cat["step"]).long(),
    )


def load_feature_records(path: str, only_correct: bool, max_records: int | None) -> tuple[list[dict], dict]:
    """Records with dense features and the trajectory manifest."""
    from dparallel.data.trajectory import read_manifest, read_trajectories

    require(Path(path).exists(), f"no trajectories at {path}: run `dparallel record ... record.features=true` first")
    manifest = read_manifest(path)
    require(
        (manifest.get("record") or {}).get("features", True),
        f"{path} was recorded without dense features: record again with record.features=true",
    )
    records = []
    for r in read_trajectories(path):
        if only_correct and (r.get("meta") or {}).get("correct") is False:
            continue
        records.append({k: r.get(k) for k in ("tokens", "order", "steps", "pred", *STATISTICS)})
        if max_records is not None and len(records) >= max_records:
            break
    require(len(records) > 0, f"no usable trajectories in {path} (all filtered out or none recorded)")
    return records, manifest


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split by record (never by step: a record's steps are strongly correlated)."""
    require(0.0 <= val_fraction < 1.0, f"filter.val_fraction={val_fraction} must be in [0, 1)")
    n_val = int(round(len(records) * val_fraction)) if len(records) > 1 else 0
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [records[i] for i in perm[:n_val]]
    train = [records[i] for i in perm[n_val:]]
    return train, val


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
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            else:
                order = torch.arange(n)
            mine = order[self.rank :: self.world]
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

    from dparallel.methods import _rank_world

    f = cfg.filter
    head = FilterHead(f.block_length, list(f.features), f.hidden)  # fails on bad features before reading data
    records, manifest = load_feature_records(f.trajectories, f.only_correct_records, f.max_records)
    train_records, val_records = split_records(records, f.val_fraction, cfg.train.seed)
    require(len(train_records) > 0, "filter.val_fraction leaves no trajectories to train on")
    stats = statistics_of(head.features)
    train_ex = build_examples(train_records, f.block_length, stats)
    val_ex = build_examples(val_records, f.block_length, stats) if val_records else None
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
    rank, world = _rank_world()
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


def load_head(folder: str | Path, manifest: dict | None = None) -> tuple[FilterHead, dict]:
    """The filter head of a component folder and its manifest."""
    manifest = manifest if manifest is not None else read_manifest(str(folder))
    require(manifest.get("component") == COMPONENT, f"{folder} is not a filter component (no component: filter)")
    head = FilterHead(
        int(manifest["block_length"]), manifest.get("features", ["conf"]), int(manifest.get("hidden", 64))
    )
    return load_weights(folder, COMPONENT, head, manifest), manifest


def attach_filter(generator, folder: str | Path, manifest: dict | None = None) -> None:
    """Give ``generator`` the ``filter`` rule of the component at ``folder`` (its base is checked by
    :func:`dparallel.components.attach`)."""
    head, manifest = load_head(folder, manifest)
    head = head.to(generator.adapter.device)
    default_threshold = float(manifest.get("threshold", 0.96))

    def make(config, explicit: dict) -> FilterRule:
        require(
            config.block_length == head.block_length,
            f"this filter was trained for block_length={head.block_length}: decode with that block_length",
        )
        return FilterRule(head, float(explicit.get("threshold", default_threshold)))

    generator.rules["filter"] = make
