"""The Learn2PD filter at decoding time: its head, the features it reads per block, and the ``filter`` rule a loaded
filter component gives the pipeline. Training: :mod:`dparallel.filters.learn2pd`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dparallel.adapters.folder import read_manifest
from dparallel.core.errors import DParallelError, require
from dparallel.engine.components import load_weights
from dparallel.engine.rules import (
    CERTAIN,
    CONFLICTS,
    STATISTICS,
    Proposal,
    Rule,
    best_masked,
    conflicts,
    token_statistics,
)

FEATURES = (*STATISTICS, "mask", "position", "step", *CONFLICTS)


COMPONENT = "filter"


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
    ``margin``, each [N, W]; only the ones ``features`` names are read; the conflict features also read
    ``proposed`` and ``block``, see :func:`conflicts`), its mask state ``masked`` [N, W] and the step inside the
    block ``step`` ([N] or an int). Committed positions read as certain (:data:`CERTAIN`; no conflict). Shared
    by training and decoding, so both see exactly the same features."""
    n, w = masked.shape
    parts = []
    found = conflicts(stats, masked) if reads_tokens(features) else {}
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
        elif name in CONFLICTS:
            parts.append(found[name].float())
        else:
            raise DParallelError(f"unknown filter feature {name!r}: choose from {', '.join(FEATURES)}")
    return torch.cat(parts, dim=1)


def statistics_of(features: Sequence[str]) -> list[str]:
    """The recorded statistics a feature list reads (``clash`` compares confidences)."""
    needed = set(features) | ({"conf"} if "clash" in features else set())
    return [f for f in STATISTICS if f in needed]


def reads_tokens(features: Sequence[str]) -> bool:
    """Whether the features read the block's tokens (``proposed``, ``block``) beside the statistics."""
    return any(f in CONFLICTS for f in features)


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

    def features(self, p: Proposal) -> torch.Tensor:
        """The head's input [B, W * F] at this step: what :func:`block_features` builds from a recorded step."""
        stats = token_statistics(p.logits)
        if reads_tokens(self.head.features):
            lo, hi = p.context.window
            stats.update(proposed=p.tokens, block=p.context.x[:, lo:hi])
        return block_features(stats, p.masked, p.step, self.head.features)

    def select(self, p: Proposal) -> torch.Tensor:
        param = next(self.head.parameters())
        prob = torch.sigmoid(self.head(self.features(p).to(param.device, param.dtype)).float())
        self.head_calls += 1
        return ((prob > self.threshold) & p.masked) | best_masked(p.confidence, p.masked)


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
    :func:`dparallel.engine.components.attach`)."""
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
