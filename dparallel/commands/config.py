"""Recipe sections of the commands: eval, bench, sweep, quickstart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dparallel.core.fields import ranged
from dparallel.data.config import SuiteConfig
from dparallel.engine.config import DecodeConfig

# DecoderSpec keys that are not decoding options
SPEC_ONLY = ("name", "reference", "frontier", "kind", "model", "component")


def decode_options(spec: dict) -> dict:
    """A decoder spec's decoding options: its keys but :data:`SPEC_ONLY`, and no unset ``threshold`` (the model's
    or component's exported threshold applies then, else :class:`DecodeConfig`'s)."""
    return {k: v for k, v in spec.items() if k not in SPEC_ONLY and not (k == "threshold" and v is None)}


@dataclass
class DecoderSpec(DecodeConfig):
    """One named decoder in an eval: a DecodeConfig plus a display name."""

    name: str = "sequential"
    threshold: float | None = None
    """the rule's threshold; unset: the model's or component's own (a filter's, a policy's), else 0.9"""
    reference: str | None = None
    """rule=oracle: the decoder (earlier in this list) whose outputs it replays"""
    frontier: str | None = None
    """the frontier family this decoder is a point of (default: its rule)"""
    kind: str | None = None
    """reference | heuristic | method | oracle (default: from the rule and eval.reference)"""
    model: str | None = None
    """decode with this model (a student, a component folder) instead of model.path"""
    component: str | None = None
    """attach this component folder to the decoder's model (model, else model.path) instead of its own base"""


@dataclass
class EvalConfig:
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    decoders: list[DecoderSpec] = field(default_factory=lambda: [DecoderSpec()])
    batch_size: int = ranged(64, 1)
    reference: str = "sequential"
    """the decoder whose accuracy - margin is the frontier's target"""
    margin: float = ranged(0.01, 0)
    """target = reference accuracy - margin"""
    plot: bool = True
    after_train: bool = False
    """train: evaluate RUN_DIR/model with this section when training ends"""


@dataclass
class QuickstartConfig:
    record_per_task: int = ranged(60, 1)
    """train-split prompts per task recorded from the teacher"""
    record_rule: str = "topk"
    """the teacher's decoder while recording: topk (one token per step, its best answers on every family) or
    confidence (~3x faster; its many-answers records are far fewer)"""
    distill_steps: int = ranged(30, 1)
    """certainty-forcing steps (a demonstration on CPU; the tiny recipe runs 300)"""
    distill_batch: int = ranged(8, 1)
    """global batch of the quickstart's distillation"""
    student_decoders: list[str] = field(default_factory=lambda: ["entropy:0.5", "entropy:1.0", "confidence:0.9"])


@dataclass
class BenchConfig:
    shape: str = ""
    """"" = model.path's model; llada-8b = the tiny family at LLaDA-8B's shapes, random bf16 weights"""
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    # none | prefix | dual, and MODE-static (StaticCache) or MODE-graph (StaticCache + CUDA graph replay)
    caches: list[str] = field(default_factory=lambda: ["dual", "prefix", "none"])
    context: int = ranged(1024, 1)
    """prompt tokens before the block"""
    block_length: int = ranged(32, 1)
    steps: int = ranged(8, 1)
    """forwards per block for both loops (topk schedule): equal NFE, TPF = block_length / steps"""
    reps: int = ranged(10, 1)
    """timed repetitions of one forward"""
    copy_mib: int = ranged(1024, 1)
    """buffer for the bandwidth measurement"""
    train_step: bool = False
    """also time one LoRA certainty-forcing step (bf16 autocast on GPU) of train_recipe"""
    train_recipe: str = "recipes/llada-8b/distill.yaml"
    """its lora and distill sections define the step"""
    train_batch: int = ranged(1, 1)
    """sequences per timed training step (the llada-8b recipe's micro batch)"""
    train_prompt: int = ranged(224, 1)
    """prompt tokens of each training sequence (+ gen 256: the paper's GSM8K shape)"""
    train_gen: int = ranged(256, 1)
    peak_tflops: float = ranged(989.0, 0, above=True)
    """the device's dense bf16 peak for MFU (H100/H200 SXM: 989)"""


@dataclass
class SweepConfig:
    method: str = "grid"
    """grid | random | bayes (wandb's search methods; --local runs the grid)"""
    metric: str = "train/loss"
    """a logged metric (train/...) or an eval cell: eval/<decoder>/<task>/<metric>"""
    goal: str = "minimize"
    """minimize | maximize"""
    parameters: dict[str, Any] = field(default_factory=dict)
    """dotted recipe key -> list of values"""
