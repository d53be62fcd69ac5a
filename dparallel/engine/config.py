"""The engine's options and per-answer statistics (torch-free: the recipe schema and ``--help`` read it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dparallel.core.errors import require
from dparallel.core.fields import ranged

TOPK_TIES = ("reference", "lowest_index")


FACTOR_MODES = ("paper", "fast_dllm")


CACHE_MODES = ("none", "prefix", "dual", "block")  # block: exact, converted models only (ar2diff/cache.py)


EOT_STOP = ("none", "accepted", "any")


@dataclass
class DecodeConfig:
    """Decoding options. Names follow LLaDA's ``generate`` where it has one."""

    rule: str = "topk"
    """topk | confidence | ltr (left to right through confident runs) | entropy | factor (| filter with a loaded
    filter component)"""
    gen_length: int = ranged(32, 1)
    """canvas length (answer tokens) per prompt; 32 fits every answer of the embedded suite"""
    block_length: int = ranged(32, 1)
    """semi-AR block; gen_length must be a multiple of it"""
    steps: int | None = ranged(None, 1)
    """topk: total steps over the canvas (default gen_length: one token per step)"""
    temperature: float = ranged(0.0, 0)
    """Gumbel-max sampling temperature (0 = argmax)"""
    remasking: str = "low_confidence"
    """low_confidence | random (topk ordering score)"""
    cfg_scale: float = ranged(0.0, 0)
    """classifier-free guidance: un + (s + 1)(cond - un), prompt masked for `un`"""
    threshold: float = ranged(0.9, 0, above=True)
    """confidence, ltr: probability >= tau; entropy: nats < threshold"""
    factor: float = ranged(1.0, 0, above=True)
    """factor rule's f"""
    factor_mode: str = "paper"
    """paper: the longest prefix with (n+1)(1-c_n) <= f | fast_dllm: Fast-dLLM's code"""
    topk_ties: str = "lowest_index"
    """lowest_index: batch-invariant, no sync | reference: LLaDA's torch.topk order"""
    logits_eos_inf: bool = False
    """never propose EOS"""
    confidence_eos_eot_inf: bool = False
    """LLaDA's option: EoT (and EOS at temperature 0) gets zero confidence"""
    seed: int = 0
    """seed of the sampling generator (temperature > 0 or remasking=random)"""
    cache: str = "none"
    """none (exact) | prefix | dual (Fast-dLLM's approximate caches) | block (exact, block models)"""
    cache_refresh: int = ranged(0, 0)
    """with a cache: also refresh every N steps inside a block (0 = at block start only)"""
    static_cache: bool = False
    """prefix/dual: keys/values in a preallocated StaticCache (fixed shapes, graph-ready)"""
    cuda_graph: bool = False
    """with static_cache on a GPU: replay each cached step from a captured CUDA graph"""
    sync_every: int = ranged(1, 1)
    """threshold rules: look on the host whether a block is done every N steps (1 = each step)"""
    eot_stop: str = "none"
    """EoTP: none | accepted (a committed EOS/EoT fills the rest) | any (cut at a proposed one)"""
    k: int = ranged(1, 1)
    """marginal | joint: tokens committed per full forward (k - 1 sampler-layer refreshes for joint)"""
    entropy_budget: float | None = ranged(None, 0, above=True)
    """marginal | joint: k becomes a cap; a forward stops committing once its commits' summed entropy would pass
    this many nats (its first commit always goes; joint sums the refreshed, conditional entropies); unset: always k"""
    kl_budget: float | None = ranged(None, 0, above=True)
    """joint: k becomes a cap; a forward stops committing once the sampler's error head predicts its commits' summed
    KL from the teacher would pass this many nats (with entropy_budget: whichever closes first); unset: always k"""

    def validate(self) -> None:
        require(
            self.kl_budget is None or self.rule == "joint",
            f"kl_budget={self.kl_budget} needs the joint rule (its error head predicts the KL): set rule=joint "
            "or drop kl_budget",
        )
        require(self.gen_length > 0, f"gen_length={self.gen_length} must be positive")
        require(
            self.block_length > 0 and self.gen_length % self.block_length == 0,
            f"gen_length={self.gen_length} is not divisible by block_length={self.block_length}: "
            "choose a block_length that divides it",
        )
        require(
            self.remasking in ("low_confidence", "random"),
            f"remasking={self.remasking!r}: use low_confidence or random",
        )
        require(self.temperature >= 0, f"temperature={self.temperature} must be >= 0")
        require(self.cache in CACHE_MODES, f"cache={self.cache!r}: choose from {', '.join(CACHE_MODES)}")
        require(self.cache == "none" or self.cfg_scale <= 0, "cfg_scale > 0 needs cache=none")
        require(
            self.factor_mode in FACTOR_MODES, f"factor_mode={self.factor_mode!r}: choose from {', '.join(FACTOR_MODES)}"
        )
        require(self.topk_ties in TOPK_TIES, f"topk_ties={self.topk_ties!r}: choose from {', '.join(TOPK_TIES)}")
        require(self.cache_refresh >= 0, f"cache_refresh={self.cache_refresh} must be >= 0")
        require(self.sync_every >= 1, f"sync_every={self.sync_every} must be >= 1")
        require(
            not self.cuda_graph or (self.static_cache and self.cache in ("prefix", "dual")),
            "cuda_graph=true replays the static cached step: set cache=dual (or prefix) and static_cache=true",
        )
        require(self.eot_stop in EOT_STOP, f"eot_stop={self.eot_stop!r}: choose from {', '.join(EOT_STOP)}")
        require(
            isinstance(self.k, int) and 1 <= self.k <= self.block_length,
            f"k={self.k} tokens per full forward must be between 1 and block_length={self.block_length}",
        )
        if self.steps is not None:
            require(
                0 < self.steps <= self.gen_length,
                f"steps={self.steps} must be between 1 and gen_length={self.gen_length}",
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length


@dataclass
class DecodeStats:
    """Per-answer statistics. ``nfe`` counts full-model forwards this row took part in while it still had masked
    positions; ``answer_tokens`` counts tokens up to and including the first EOS/EoT."""

    nfe: int
    answer_tokens: int
    wall_s: float
    sampler_calls: int = 0

    @property
    def tpf(self) -> float:
        return self.answer_tokens / max(self.nfe, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.answer_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tpf": self.tpf, "tokens_per_s": self.tokens_per_s}
