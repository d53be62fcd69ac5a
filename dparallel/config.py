"""Recipe schema: OmegaConf YAML merged over structured dataclasses.

A recipe is one YAML file; ``key=value`` overrides on the command line use dotted keys. Unknown keys, wrong
types and bad values are reported on one line naming the key (and the closest valid key) — see :func:`load_recipe`.
Methods add their own section by registering a dataclass in :data:`METHOD_SECTIONS` (see ``dparallel.methods``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dparallel.bench import BenchConfig
from dparallel.data.suite import TASKS
from dparallel.engine.sampler import DecodeConfig
from dparallel.errors import DParallelError, first_line
from dparallel.sweep import SweepConfig


@dataclass
class ModelConfig:
    path: str = "builtin:tiny-teacher"  # a local folder, builtin:NAME (shipped with the package) or a Hub id
    family: str | None = None  # tiny | llada | dream | hf-mlm; default: the folder's dparallel.json
    revision: str | None = None  # Hub revision (branch, tag or commit) to pin
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N


@dataclass
class TinyModelConfig:
    """Shape of a fresh tiny model (a stock LlamaConfig) when training one from scratch."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0


@dataclass
class SuiteConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # suite tasks (default: all ten)
    split: str = "test"  # train | test | longer
    n_per_task: int = 50  # examples per task
    seed: int = 0


@dataclass
class TrainConfig:
    max_steps: int = 1000
    schedule_steps: int | None = None  # length of the lr schedule (default max_steps); larger = stop mid-decay
    global_batch_size: int = 64  # per-device batch x accumulation x world size
    micro_batch_size: int | None = None  # per-device batch; default: global / world size (no accumulation)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16-mixed on GPU, 32 on CPU) | 32-true | bf16-mixed | bf16-true
    strategy: str = "auto"  # auto | ddp | fsdp | deepspeed_stage_2 | deepspeed_stage_2_offload | deepspeed_stage_3
    devices: str = "auto"  # Lightning's devices (auto, N, or a list)
    num_nodes: int = 1
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model (GPU)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # steps between checkpoints (the last one is always kept for resume)
    wandb: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "dparallel"
    num_workers: int = 0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] | None = None  # default: the adapter's family targets


@dataclass
class DecoderSpec(DecodeConfig):
    """One named decoder in an eval: a DecodeConfig plus a display name."""

    name: str = "sequential"
    reference: str | None = None  # rule=oracle: the decoder (earlier in this list) whose outputs it replays
    frontier: str | None = None  # the frontier family this decoder is a point of (default: its rule)
    kind: str | None = None  # reference | heuristic | method | oracle (default: from the rule and eval.reference)
    model: str | None = None  # decode with this model (a student, a component folder) instead of model.path


@dataclass
class EvalConfig:
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    decoders: list[DecoderSpec] = field(default_factory=lambda: [DecoderSpec()])
    batch_size: int = 64
    reference: str = "sequential"  # the decoder whose accuracy - margin is the frontier's target
    margin: float = 0.01  # target = reference accuracy - margin
    plot: bool = True
    after_train: bool = False  # train: evaluate RUN_DIR/model with this section when training ends


@dataclass
class QuickstartConfig:
    record_per_task: int = 60  # train-split prompts per task recorded from the teacher
    record_rule: str = "confidence"  # the teacher's decoder while recording (sequential is ~20x slower on CPU)
    distill_steps: int = 30  # certainty-forcing steps (a demonstration on CPU; the tiny recipe runs 300)
    distill_batch: int = 8  # global batch of the quickstart's distillation
    student_decoders: list[str] = field(default_factory=lambda: ["entropy:0.5", "entropy:1.0", "confidence:0.9"])


# Sections contributed by methods: name -> dataclass. Filled by dparallel.methods at import.
METHOD_SECTIONS: dict[str, type] = {}
# Sections of commands that are not training methods (record): name -> dataclass, filled by their modules.
COMMAND_SECTIONS: dict[str, type] = {}


def recipe_schema() -> Any:
    """The Recipe dataclass, built from the fixed sections plus every registered method section."""
    import dparallel.data.record  # noqa: F401  (fills COMMAND_SECTIONS)
    import dparallel.methods  # noqa: F401  (registering the methods fills METHOD_SECTIONS)

    fixed = [
        ("name", str, field(default="recipe")),
        ("run_dir", str, field(default="runs/${name}")),
        ("method", str, field(default="")),  # the training method this recipe runs (train command)
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        ("tiny", TinyModelConfig, field(default_factory=TinyModelConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
        ("lora", LoraConfig, field(default_factory=LoraConfig)),
        ("decode", DecodeConfig, field(default_factory=DecodeConfig)),
        ("eval", EvalConfig, field(default_factory=EvalConfig)),
        ("bench", BenchConfig, field(default_factory=BenchConfig)),
        ("sweep", SweepConfig, field(default_factory=SweepConfig)),
        ("quickstart", QuickstartConfig, field(default_factory=QuickstartConfig)),
    ]
    sections = {**COMMAND_SECTIONS, **METHOD_SECTIONS}
    extra = [(k, v, field(default_factory=v)) for k, v in sorted(sections.items())]
    return dataclasses.make_dataclass("Recipe", fixed + extra)


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
            keys += _valid_keys(f.type, full + ".")
    return keys


def _suggest(key: str, schema: Any) -> str:
    close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _resolve_types(schema: Any) -> None:
    """make_dataclass/`from __future__` leave string annotations; resolve them so keys can be walked."""
    module = __import__("sys").modules.get(schema.__module__)  # a section's own names (nested dataclasses)
    hints = __import__("typing").get_type_hints(schema, globals(), vars(module) if module else None)
    for f in dataclasses.fields(schema):
        f.type = hints[f.name]
        if dataclasses.is_dataclass(f.type):
            _resolve_types(f.type)


def load_recipe(path: str | None, overrides: list[str] = ()) -> DictConfig:
    """Merge a recipe file and ``key=value`` overrides over the schema. Raises DParallelError on bad input."""
    schema = recipe_schema()
    _resolve_types(schema)
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise DParallelError(f"recipe {path} not found: pass the path of a YAML file (see recipes/)")
        try:
            layers.append(OmegaConf.load(file))
        except Exception as e:  # yaml.YAMLError and friends: name the file, not a traceback
            raise DParallelError(f"recipe {path} is not valid YAML: {first_line(e)}") from None
        if "name" not in layers[0]:
            layers[0].name = file.stem
    for item in overrides:
        if "=" not in item:
            raise DParallelError(f"override {item!r} is not key=value: write e.g. train.lr=1e-4")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(base, *layers)
        OmegaConf.resolve(cfg)
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as e:
        raise DParallelError(_describe(e, schema)) from None
    return cfg


def _describe(e: OmegaConfBaseException, schema: Any) -> str:
    key = getattr(e, "full_key", None) or ""
    if isinstance(e, ConfigKeyError) or "not in" in str(e):
        name = str(e).split("'")[1] if "'" in str(e) else key
        full = key or name
        return f"unknown recipe key '{full}'{_suggest(full, schema)}: remove it or fix its spelling"
    msg = first_line(e)
    return f"bad value for recipe key '{key}': {msg}"


def save_recipe(cfg: DictConfig, run_dir: str | Path) -> Path:
    """Write the resolved recipe to RUN_DIR/config.yaml (atomically)."""
    from dparallel.io import atomic_write_text

    out = Path(run_dir) / "config.yaml"
    atomic_write_text(out, OmegaConf.to_yaml(cfg))
    return out


def describe_keys(schema: Any | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) for every recipe key, read from the schema source for ``--help``."""
    import inspect

    schema = schema or recipe_schema()
    if prefix == "":
        _resolve_types(schema)
    rows = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
            rows += describe_keys(f.type, key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else "(list)"
        doc = ""
        try:
            for line in inspect.getsource(schema).splitlines():
                if line.strip().startswith(f"{f.name}:") and "#" in line:
                    doc = line.split("#", 1)[1].strip()
        except (OSError, TypeError):
            pass
        rows.append((key, str(default), doc))
    return rows
