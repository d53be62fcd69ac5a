"""The ``filter`` recipe section (Learn2PD)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dparallel.core.fields import ranged


@dataclass
class FilterConfig:
    trajectories: str = "runs/record-features/trajectories"
    """recorded with record.features=true"""
    block_length: int = ranged(32, 1)
    """W: the decoding block the filter sees (must divide the records' canvas)"""
    hidden: int = ranged(64, 1)
    """width of the MLP's hidden layer"""
    features: list[str] = field(default_factory=lambda: ["conf"])
    """conf|entropy|margin|mask|position|step|repeat|clash (repeat, clash: the proposal repeats a block token)"""
    threshold: float = ranged(0.96, 0, 1, above=True, below=True)
    """commit a masked position when sigmoid(logit) > threshold (saved as the default)"""
    class_balance: bool = False
    """BCE pos_weight = negatives / positives of the training examples"""
    pos_weight: float = ranged(1.0, 0, above=True)
    """BCE pos_weight when class_balance is false"""
    val_fraction: float = ranged(0.1, 0, 1, below=True)
    """records held out for precision / recall / false-positive rate"""
    eval_every: int = ranged(50, 1)
    """steps between held-out evaluations (and at the last step)"""
    only_correct_records: bool = False
    """drop trajectories whose teacher answer was wrong"""
    max_records: int | None = ranged(None, 1)
    """use at most this many trajectories (None: all)"""
    shuffle: bool = True
    """reshuffle the examples every epoch"""
