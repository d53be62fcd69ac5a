"""Recipe sections of the training layer: the trainer, LoRA, and the methods in dparallel/methods."""

from __future__ import annotations

from dataclasses import dataclass, field

from dparallel.core.fields import ranged
from dparallel.data.suite import GEN_LENGTH, TASKS


@dataclass
class TrainConfig:
    max_steps: int = ranged(1000, 1)
    schedule_steps: int | None = ranged(None, 1)
    """length of the lr schedule (default max_steps); larger = stop mid-decay"""
    global_batch_size: int = ranged(64, 1)
    """per-device batch x accumulation x world size"""
    micro_batch_size: int | None = ranged(None, 1)
    """per-device batch; default: global / world size (no accumulation)"""
    lr: float = ranged(1e-3, 0, above=True)
    weight_decay: float = ranged(0.0, 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = ranged(0, 0)
    schedule: str = "cosine"
    """cosine | constant"""
    min_lr_ratio: float = ranged(0.1, 0, 1)
    """cosine floor as a fraction of lr"""
    grad_clip: float = ranged(1.0, 0)
    precision: str = "auto"
    """auto (bf16-mixed on GPU, 32 on CPU) | 32-true | bf16-mixed | bf16-true"""
    strategy: str = "auto"
    """auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_2_offload | deepspeed_stage_3"""
    devices: str = "auto"
    """Lightning's devices (auto, N, or a list)"""
    num_nodes: int = ranged(1, 1)
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile the model (GPU)"""
    seed: int = 0
    log_every: int = ranged(10, 1)
    checkpoint_every: int = ranged(500, 1)
    """steps between checkpoints (the last one is always kept for resume)"""
    wandb: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "dparallel"
    num_workers: int = ranged(0, 0)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = ranged(16, 1)
    alpha: int = ranged(16, 0, above=True)
    dropout: float = ranged(0.0, 0, 1, below=True)
    targets: list[str] | None = None
    """default: the adapter's family targets"""


@dataclass
class PretrainConfig:
    tasks: list[str] = field(
        default_factory=lambda: list(TASKS)
    )  # suite tasks; one listed twice is drawn twice as often
    gen_lengths: list[int] = field(default_factory=lambda: [GEN_LENGTH])
    """answer canvas per batch, drawn uniformly"""
    eps: float = ranged(1e-3, 0, 1, above=True, below=True)
    """smallest mask probability"""
    stratified: bool = True
    """stratified t over the batch (low-discrepancy sampler)"""
    init: str = "scratch"
    """scratch (a fresh tiny model from the `tiny` section) | pretrained (model.path)"""
    save_dtype: str = "bfloat16"
    """dtype of the saved model weights"""


@dataclass
class DistillConfig:
    trajectories: str = "runs/record/trajectories"
    """folder written by `dparallel record` (shards + manifest.json)"""
    block_length: int = ranged(32, 1)
    """the semi-AR block trained on; must divide the records' canvas length"""
    mask_ratio: list[float] = field(default_factory=lambda: [0.5])
    """[p] fixed, or [lo, hi]: p ~ U(lo, hi) per row"""
    complementary: bool = True
    """second pass masks the block's complement (every block token supervised once)"""
    single_pass: bool = False
    """one pass only (needs complementary=false); else a second independent draw"""
    mask_suffix: bool = True
    """blocks after the chosen one are masked, without loss; false: they stay clean"""
    full_response: bool = False
    """Dream variant: the whole response is the block (masked at p), no suffix"""
    temperature: float = ranged(0.5, 0, above=True)
    """T of the entropy term, H(softmax(logits / T))"""
    entropy_weight: float = ranged(2.0, 0)
    """w: 2 for LLaDA, 1 for Dream"""
    correct_only: bool = True
    """entropy only where the argmax already equals the target"""
    only_correct_records: bool = True
    """drop trajectories whose meta marks the teacher's answer as wrong"""
    max_records: int | None = ranged(None, 1)
    """use at most this many trajectories (None: all)"""
    balance_tasks: bool = False
    """repeat each task's trajectories (meta.task, else meta.source) up to the largest task's count"""
    shuffle: bool = True
    """reshuffle the trajectories every epoch"""
    save_dtype: str = "bfloat16"
    """dtype of the saved student"""
