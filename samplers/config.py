"""The ``joint`` and ``policy`` recipe sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from dparallel.core.fields import ranged
from dparallel.data.config import SourceConfig


@dataclass
class JointConfig:
    trajectories: str = "runs/record-sequential/trajectories"
    """one token per forward (rule=marginal k=1)"""
    block_length: int = ranged(32, 1)
    """W: the window the sampler layer attends over (the decoding block)"""
    depth: int = ranged(4, 1)
    """K: the deepest unroll trained (k tokens per forward need k - 1 refreshes)"""
    k: int = ranged(4, 1)
    """tokens per full forward: the exported decoding default"""
    val_fraction: float = ranged(0.1, 0, 1, below=True)
    """share held out for val/kl (of the records, or of the windows: see val_by)"""
    val_by: str = "records"
    """records (whole trajectories held out) | windows (windows of the same trajectories)"""
    val_windows: int = ranged(64, 1)
    """held-out windows val/kl averages over"""
    eval_every: int = ranged(25, 1)
    """steps between val/kl evaluations (and at the start)"""
    max_records: int | None = ranged(None, 1)
    """use at most this many trajectories (None: all)"""
    init: str | None = None
    """start from this joint component folder (layer and error head) instead of a fresh layer"""
    head_only: bool = False
    """train the error head alone, the layer frozen as loaded from init (refit the stop signal of a trained layer)"""


REWARDS = ("multiplicative", "additive")


@dataclass
class PolicyConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    """training prompts (default: the suite's train split)"""
    checker: str = "auto"
    """correctness: auto (the suite's own) | exact | last_number | module:function"""
    gen_length: int = ranged(128, 1)
    """L: the answer canvas of the rollouts"""
    block_length: int = ranged(128, 1)
    """rollout block (gen_length = one block of full diffusion; 32 = semi-AR)"""
    group_size: int = ranged(8, 1)
    """G: policy rollouts per prompt"""
    temperature: float = ranged(1.0, 0, above=True)
    """Bernoulli temperature of the rollouts (paper: 0.5 at block 32, 1.0 at block 256)"""
    alpha: float = ranged(1.0, 0)
    """speed exponent (multiplicative) or per-step penalty x L (additive)"""
    reward: str = "multiplicative"
    """multiplicative | additive"""
    clip_eps: float = ranged(0.5, 0, above=True)
    """PPO clip range"""
    updates_per_batch: int = ranged(2, 1)
    """optimizer updates per rollout batch"""
    std_normalize: bool = False
    """divide group advantages by the group's std"""
    kl_coef: float = ranged(0.0, 0)
    """weight of KL(pi || pi_init) (0: off, the paper's setting)"""
    expert_steering: bool = False
    """add a confidence-threshold rollout to each group (mixture likelihood)"""
    expert_threshold: float = ranged(0.9, 0, 1, above=True)
    """the expert's confidence threshold"""
    max_grad_norm: float = ranged(1.0, 0)
    """clip the policy's gradient norm (0: off); train.grad_clip must be 0 (manual opt)"""
    features: list[str] = field(default_factory=lambda: ["conf"])
    """conf | entropy | margin (the dLLM's statistics) | repeat | clash (its proposal's conflicts)"""
    topk: int = ranged(0, 0)
    """also the k largest probabilities (0: off)"""
    dim: int = ranged(128, 1)
    ffn: int = ranged(512, 1)
    heads: int = ranged(2, 1)
    init_bias: float = -2.0
    """output bias: sigmoid(-2) ~ 0.12 per position at the start"""
    threshold: float = ranged(0.5, 0, 1, above=True, below=True)
    """greedy decoding: commit p > threshold (the exported default)"""
