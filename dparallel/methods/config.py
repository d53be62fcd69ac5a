"""Recipe sections of the training layer: the trainer, LoRA, and the methods in dparallel/methods."""

from __future__ import annotations

from dataclasses import dataclass, field

from dparallel.data.suite import GEN_LENGTH, TASKS


@dataclass
class TrainConfig:
    max_steps: int = 1000
    schedule_steps: int | None = None
    """length of the lr schedule (default max_steps); larger = stop mid-decay"""
    global_batch_size: int = 64
    """per-device batch x accumulation x world size"""
    micro_batch_size: int | None = None
    """per-device batch; default: global / world size (no accumulation)"""
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    schedule: str = "cosine"
    """cosine | constant"""
    min_lr_ratio: float = 0.1
    """cosine floor as a fraction of lr"""
    grad_clip: float = 1.0
    precision: str = "auto"
    """auto (bf16-mixed on GPU, 32 on CPU) | 32-true | bf16-mixed | bf16-true"""
    strategy: str = "auto"
    """auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_2_offload | deepspeed_stage_3"""
    devices: str = "auto"
    """Lightning's devices (auto, N, or a list)"""
    num_nodes: int = 1
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile the model (GPU)"""
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    """steps between checkpoints (the last one is always kept for resume)"""
    wandb: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "dparallel"
    num_workers: int = 0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] | None = None
    """default: the adapter's family targets"""


@dataclass
class PretrainConfig:
    tasks: list[str] = field(
        default_factory=lambda: list(TASKS)
    )  # suite tasks; one listed twice is drawn twice as often
    gen_lengths: list[int] = field(default_factory=lambda: [GEN_LENGTH])
    """answer canvas per batch, drawn uniformly"""
    eps: float = 1e-3
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
    block_length: int = 32
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
    temperature: float = 0.5
    """T of the entropy term, H(softmax(logits / T))"""
    entropy_weight: float = 2.0
    """w: 2 for LLaDA, 1 for Dream"""
    correct_only: bool = True
    """entropy only where the argmax already equals the target"""
    only_correct_records: bool = True
    """drop trajectories whose meta marks the teacher's answer as wrong"""
    max_records: int | None = None
    """use at most this many trajectories (None: all)"""
    shuffle: bool = True
    """reshuffle the trajectories every epoch"""
    save_dtype: str = "bfloat16"
    """dtype of the saved student"""
