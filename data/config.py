"""Recipe sections of the data layer: the suite, a prompt source, recording trajectories."""

from __future__ import annotations

from dataclasses import dataclass, field

from dparallel.core.fields import ranged
from dparallel.data.suite import TASKS


@dataclass
class SuiteConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """suite tasks (default: all ten)"""
    split: str = "test"
    """train | test | longer"""
    n_per_task: int = ranged(50, 1)
    """examples per task"""
    seed: int = 0


KINDS = ("auto", "suite", "jsonl", "csv", "parquet", "hf", "hub")


CHECKERS = ("auto", "none", "exact", "last_number", "suite")


@dataclass
class RecordSuiteConfig(SuiteConfig):
    """The suite as a prompt source: its train split by default (evaluation uses test)."""

    split: str = "train"
    """train | test | longer"""
    n_per_task: int = ranged(100, 1)
    """examples per task"""


@dataclass
class SourceConfig:
    kind: str = "auto"
    """auto (from path: .jsonl/.json, .csv, .parquet, a folder = saved HF dataset, owner/name = Hub; none = suite)"""
    path: str | None = None
    """the file or folder (kind != suite)"""
    split: str | None = None
    """the split of a saved DatasetDict or a Hub dataset (default: train, or its only split)"""
    revision: str | None = None
    """a Hub dataset's revision (branch, tag or commit) to pin"""
    prompt_column: str = "prompt"
    answer_column: str | None = "answer"
    """reference answers (optional: used when the column exists)"""
    id_column: str | None = None
    """example ids (default: the row number)"""
    chat_template: bool = False
    """wrap each prompt in the tokenizer's chat template"""
    limit: int | None = ranged(None, 1)
    """keep the first N prompts (after dedup)"""
    suite: RecordSuiteConfig = field(default_factory=RecordSuiteConfig)
    """kind=suite"""


@dataclass
class RecordConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    out: str = "${run_dir}/trajectories"
    """output folder: shard-NNNNN/ + sidecars, manifest.json, tokenizer/"""
    shard_size: int = ranged(256, 1)
    """prompts per shard: the unit of resume and of each rank's work"""
    batch_size: int = ranged(32, 1)
    """prompts per engine call"""
    features: bool = False
    """also store dense per-step pred, conf, entropy, margin [steps, G] (Learn2PD's inputs)"""
    oracle: bool = False
    """keep Learn2PD's oracle replay of each decode instead of the decode: the same tokens, each position committed
    at the first step whose argmax already equals it (the states a filter decodes in; its training data)"""
    keep: str = "all"
    """all | correct (drop records the checker marks wrong)"""
    checker: str = "auto"
    """auto (suite: its own; else none) | none | exact | last_number | suite | module:function"""
    dedup: bool = True
    """drop repeated prompts (by hash), keeping the first"""
    max_shards: int | None = ranged(None, 1)
    """stop after writing this many shards in this run (a rerun resumes)"""
    wait_timeout_s: float = ranged(3600.0, 0, above=True)
    """how long ranks wait for each other at the end before failing"""
