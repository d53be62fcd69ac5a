"""The ``filter`` recipe section (Learn2PD)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FilterConfig:
    trajectories: str = "runs/record-features/trajectories"
    """recorded with record.features=true"""
    block_length: int = 32
    """W: the decoding block the filter sees (must divide the records' canvas)"""
    hidden: int = 64
    """width of the MLP's hidden layer"""
    features: list[str] = field(default_factory=lambda: ["conf"])
    """conf|entropy|margin|mask|position|step"""
    threshold: float = 0.96
    """commit a masked position when sigmoid(logit) > threshold (saved as the default)"""
    class_balance: bool = False
    """BCE pos_weight = negatives / positives of the training examples"""
    pos_weight: float = 1.0
    """BCE pos_weight when class_balance is false"""
    val_fraction: float = 0.1
    """records held out for precision / recall / false-positive rate"""
    eval_every: int = 50
    """steps between held-out evaluations (and at the last step)"""
    only_correct_records: bool = False
    """drop trajectories whose teacher answer was wrong"""
    max_records: int | None = None
    """use at most this many trajectories (None: all)"""
    shuffle: bool = True
    """reshuffle the examples every epoch"""
