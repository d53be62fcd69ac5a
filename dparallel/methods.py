"""The method registry: ``recipe.method`` -> how to build its LightningModule and its training data.

Adding a method: write its module (a :class:`~dparallel.training.DParallelModule` subclass) and its config
dataclass, then add one :class:`Method` entry here; its recipe section becomes valid automatically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from dparallel.config import METHOD_SECTIONS
from dparallel.distill import DistillConfig
from dparallel.errors import DParallelError
from dparallel.pretrain import MaskedDiffusionModule, PretrainConfig
from dparallel.training import DParallelModule


@dataclass(frozen=True)
class Method:
    """``build(cfg, micro_batch, start_batch)`` returns the module and its train dataloader; ``save`` writes the
    trained artifact into a folder. ``component`` is what the artifact is (``dparallel.json``'s ``component``):
    ``base``/``student`` for a whole model, or the kind of a component that rides on a frozen base, whose
    ``attach(generator, folder, manifest)`` gives a loaded generator the component's decoding rule."""

    name: str
    section: type
    build: Callable[[DictConfig, int, int], tuple[DParallelModule, object]]
    save: Callable[[DParallelModule, DictConfig, Path], None]
    component: str = "base"
    attach: Callable[[object, str, dict], None] | None = None


def _build_pretrain(cfg: DictConfig, micro: int, start_batch: int):
    from torch.utils.data import DataLoader

    from dparallel.adapters import load_adapter
    from dparallel.data.sft import SuiteBatches
    from dparallel.tiny import new_tiny_adapter

    if cfg.pretrain.init == "scratch":
        adapter = new_tiny_adapter(cfg.tiny, seed=cfg.train.seed)
    else:
        adapter = load_adapter(cfg.model.path, family=cfg.model.family, revision=cfg.model.revision)
    if cfg.lora.enabled:
        from dparallel.training import apply_lora

        apply_lora(adapter, cfg.lora)
    if cfg.train.gradient_checkpointing:
        adapter.model.gradient_checkpointing_enable()
    rank, world = _rank_world()
    ids = adapter.ids
    stream = SuiteBatches(
        adapter.tokenizer,
        list(cfg.pretrain.tasks),
        micro,
        list(cfg.pretrain.gen_lengths),
        ids.eos,
        ids.pad,
        seed=cfg.train.seed,
        rank=rank,
        world=world,
        start_batch=start_batch,
    )
    return MaskedDiffusionModule(cfg, adapter), DataLoader(stream, batch_size=None, num_workers=cfg.train.num_workers)


def _save_model(module: DParallelModule, cfg: DictConfig, out: Path) -> None:
    from dparallel.tiny import save_model_folder

    # The recipe's canvas becomes the model's default, so generate() without options fits the answers it learned.
    decoding = {"gen_length": cfg.decode.gen_length, "block_length": cfg.decode.block_length}
    save_model_folder(module.adapter, out, dtype=cfg.pretrain.save_dtype, recipe=cfg, decoding=decoding)


def _build_distill(cfg: DictConfig, micro: int, start_batch: int):
    from dparallel.distill import build

    return build(cfg, micro, start_batch)


def _save_distill(module: DParallelModule, cfg: DictConfig, out: Path) -> None:
    from dparallel.distill import save

    save(module, cfg, out)


def _rank_world() -> tuple[int, int]:
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    METHODS[method.name] = method
    METHOD_SECTIONS[method.name] = method.section


def component_of(method: str, default: str = "base") -> str:
    """What a method's artifact is (``base``, ``student``, ``filter`` ...); ``default`` for an unknown method."""
    return METHODS[method].component if method in METHODS else default


def component_attach(kind: str) -> Callable[[object, str, dict], None]:
    """The ``attach`` of the method whose artifact is the component ``kind``."""
    for m in METHODS.values():
        if m.component == kind and m.attach is not None:
            return m.attach
    kinds = sorted(m.component for m in METHODS.values() if m.attach is not None)
    raise DParallelError(f"unknown component kind {kind!r}: this dparallel loads {', '.join(kinds)}")


register_method(Method("pretrain", PretrainConfig, _build_pretrain, _save_model))
register_method(Method("distill", DistillConfig, _build_distill, _save_distill, component="student"))


# Methods whose code lives in the design card's top-level folders. Each module imports ``dparallel.methods`` only
# inside functions, so importing it here is not circular.
from dparallel.ar2diff import method as ar2diff_method  # noqa: E402
from dparallel.ar2diff.module import Ar2DiffConfig  # noqa: E402
from dparallel.filters import learn2pd  # noqa: E402
from dparallel.samplers import joint, policy, policy_train  # noqa: E402

register_method(Method("ar", ar2diff_method.ARConfig, ar2diff_method.build_ar, ar2diff_method.save_ar))
register_method(Method("ar2diff", Ar2DiffConfig, ar2diff_method.build_ar2diff, ar2diff_method.save_block))
register_method(
    Method(
        "filter",
        learn2pd.FilterConfig,
        learn2pd.build,
        learn2pd.save,
        component="filter",
        attach=learn2pd.attach_filter,
    )
)
register_method(
    Method("joint", joint.JointConfig, joint.build, joint.save, component="joint", attach=joint.attach_joint)
)
register_method(
    Method(
        "policy",
        policy_train.PolicyConfig,
        policy_train.build,
        policy_train.save,
        component="policy",
        attach=policy.attach_policy,
    )
)
