"""The ``ar`` and ``ar2diff`` recipe sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from dparallel.core.errors import require
from dparallel.core.fields import ranged
from dparallel.data.config import SourceConfig
from dparallel.data.suite import TASKS


@dataclass
class ARConfig:
    source: SourceConfig = field(default_factory=lambda: SourceConfig(kind="suite"))
    """suite, or jsonl/csv/hf"""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    gen_lengths: list[int] = field(default_factory=lambda: [64])
    """answer canvas per batch (EOS-padded)"""
    init: str = "pretrained"
    """pretrained (model.path, read causally) | scratch (a fresh model from `tiny`)"""
    save_dtype: str = "bfloat16"


NOISE = ("block", "sample")


CURRICULA = ("none", "grow", "jump")


TARGETS = ("data", "parent")


@dataclass
class Ar2DiffConfig:
    source: SourceConfig = field(default_factory=lambda: SourceConfig(kind="suite"))
    """suite, or jsonl/csv/hf"""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    gen_lengths: list[int] = field(default_factory=lambda: [64])
    """answer canvas; a multiple of block_size"""
    block_size: int = ranged(16, 1)
    """attention block of the converted model (Fast-dLLM v2: 32)"""
    noise: str = "block"
    """block (one t per block) | sample (one t per row)"""
    eps: float = ranged(1e-3, 0, 1, above=True, below=True)
    """smallest mask probability"""
    position_slope: float = ranged(0.0, 0, 2)
    """Efficient-DLM: later tokens of a block masked more (0 = uniform; at most 2)"""
    inverse_t_weight: bool = False
    """CE / p (BD3-LM, SDAR); false: mean CE over masked tokens (Fast-dLLM v2)"""
    token_shift: bool = True
    """position p predicted from p - 1, as the AR parent (Fast-dLLM v2, NBDiff)"""
    complementary: bool = True
    """a second copy masks the complement (Fast-dLLM v2)"""
    context_causal: bool = False
    """clean half token-causal (NBDiff); implied by ar_loss_weight > 0"""
    ar_loss_weight: float = ranged(0.0, 0)
    """weight of the AR loss on the clean half (NBDiff; makes the clean half causal)"""
    curriculum: str = "none"
    """none | grow (block 1, 2, 4 ... block_size) | jump (1, then block_size)"""
    curriculum_steps: int = ranged(0, 0)
    """steps until the full block size"""
    targets: str = "data"
    """data (the source's answers) | parent (the parent's greedy answers: sequence-level distillation, one answer
    per prompt where the data allows many; ar2diff/targets.py)"""
    parent_prompts: int = ranged(6000, 1)
    """targets=parent on the suite: train prompts per task that the parent answers"""
    save_dtype: str = "bfloat16"
    """dtype of the saved model"""

    @property
    def causal_context(self) -> bool:
        """The clean half's attention: token-causal when asked, and always with the AR loss (a block-causal
        clean half would see the very tokens it predicts)."""
        return self.context_causal or self.ar_loss_weight > 0

    def validate(self) -> None:
        require(self.targets in TARGETS, f"ar2diff.targets={self.targets!r}: choose from {', '.join(TARGETS)}")
        require(self.noise in NOISE, f"ar2diff.noise={self.noise!r}: choose from {', '.join(NOISE)}")
        require(self.curriculum in CURRICULA, f"ar2diff.curriculum={self.curriculum!r}: use {', '.join(CURRICULA)}")
        require(0 <= self.position_slope <= 2, f"ar2diff.position_slope={self.position_slope} must be in [0, 2]")
        require(0 < self.eps < 1, f"ar2diff.eps={self.eps} must be in (0, 1)")
        require(self.ar_loss_weight >= 0, f"ar2diff.ar_loss_weight={self.ar_loss_weight} must be >= 0")
        bad = [g for g in self.gen_lengths if g % self.block_size]
        require(not bad, f"ar2diff.gen_lengths {bad} are not multiples of ar2diff.block_size={self.block_size}")
        if self.curriculum == "grow":
            require(
                self.block_size & (self.block_size - 1) == 0,
                f"ar2diff.curriculum=grow doubles the block: block_size={self.block_size} must be a power of 2",
            )
