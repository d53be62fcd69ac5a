"""The one registry: plain data tables that name, by import path, every model family, decoding loop, training
method and recipe section. Nothing here imports them; :func:`resolve` does, when one is used. So this module sits
at the bottom of the layers, every layer may read it, and adding a family or a method is one row here.

A path is ``"package.module:attribute"``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dparallel.core.errors import require

# model family (dparallel.json's `family`, model.family) -> its adapter class
FAMILIES: dict[str, str] = {
    "tiny": "dparallel.adapters.tiny:TinyAdapter",
    "llada": "dparallel.adapters.llada:LLaDAAdapter",
    "llada-remote": "dparallel.adapters.llada:LLaDARemoteAdapter",
    "dream": "dparallel.adapters.dream:DreamAdapter",
    "dream-remote": "dparallel.adapters.dream:DreamRemoteAdapter",
    "hf-mlm": "dparallel.adapters.mlm:MaskedLMAdapter",
    "ar": "dparallel.ar2diff.family:ARAdapter",
    "block": "dparallel.ar2diff.family:BlockAdapter",
}

# an adapter's `decoder` capability -> the decoding loop that runs it
DECODERS: dict[str, str] = {
    "diffusion": "dparallel.engine.decoder:Decoder",
    "ar": "dparallel.ar2diff.decoding:ARDecoder",
}

# recipe section -> its dataclass (torch-free modules, so `--help` stays fast)
SECTIONS: dict[str, str] = {
    "model": "dparallel.adapters.config:ModelConfig",
    "tiny": "dparallel.adapters.config:TinyModelConfig",
    "decode": "dparallel.engine.config:DecodeConfig",
    "record": "dparallel.data.config:RecordConfig",
    "train": "dparallel.methods.config:TrainConfig",
    "lora": "dparallel.methods.config:LoraConfig",
    "pretrain": "dparallel.methods.config:PretrainConfig",
    "distill": "dparallel.methods.config:DistillConfig",
    "filter": "dparallel.filters.config:FilterConfig",
    "joint": "dparallel.samplers.config:JointConfig",
    "policy": "dparallel.samplers.config:PolicyConfig",
    "ar": "dparallel.ar2diff.config:ARConfig",
    "ar2diff": "dparallel.ar2diff.config:Ar2DiffConfig",
    "eval": "dparallel.commands.config:EvalConfig",
    "bench": "dparallel.commands.config:BenchConfig",
    "sweep": "dparallel.commands.config:SweepConfig",
    "quickstart": "dparallel.commands.config:QuickstartConfig",
}

TRAINING = ("model", "train", "lora", "eval")  # the sections every training method reads


@dataclass(frozen=True)
class Method:
    """A training method. ``build`` (a path) is ``build(cfg, micro_batch, start_batch) -> (LightningModule,
    train dataloader)``; ``save`` is ``save(module, cfg, folder)``, writing the artifact. ``sections`` are the
    recipe sections it reads. ``component`` is what the artifact is (``dparallel.json``'s ``component``):
    ``base``/``student`` for a whole model, or the kind of a part that rides on a frozen base, whose ``attach``
    (a path: ``attach(pipeline, folder, manifest)``) gives a loaded pipeline the component's decoding rule."""

    build: str
    save: str
    sections: tuple[str, ...]
    component: str = "base"
    attach: str | None = None


def _method(module: str, sections: tuple[str, ...], component: str = "base", attach: str | None = None, suffix=""):
    return Method(f"{module}:build{suffix}", f"{module}:save{suffix}", (*TRAINING, *sections), component, attach)


METHODS: dict[str, Method] = {
    "pretrain": _method("dparallel.methods.pretrain", ("tiny", "pretrain", "decode")),
    "distill": _method("dparallel.methods.distill", ("distill", "decode"), "student"),
    "filter": _method("dparallel.filters.learn2pd", ("filter",), "filter", "dparallel.filters.rule:attach_filter"),
    "joint": _method("dparallel.samplers.joint_train", ("joint",), "joint", "dparallel.samplers.joint:attach_joint"),
    "policy": _method(
        "dparallel.samplers.policy_train", ("policy", "decode"), "policy", "dparallel.samplers.policy:attach_policy"
    ),
    "ar": _method("dparallel.ar2diff.method", ("tiny", "ar", "decode"), suffix="_ar"),
    "ar2diff": _method("dparallel.ar2diff.method", ("tiny", "ar2diff", "decode"), suffix="_ar2diff"),
}

# CLI command -> the sections it reads besides those the recipe names and its method's
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": (),
    "eval": ("model", "eval"),
    "generate": ("model", "decode"),
    "quickstart": ("model", "quickstart", "eval", "decode"),
    "sweep": ("sweep", "train"),
    "bench": ("model", "bench"),
    "record": ("model", "decode", "record"),
}


def resolve(path: str):
    """Import ``"package.module:attribute"`` and return the attribute."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name) if name else importlib.import_module(module)


def method(name: str) -> Method:
    require(name in METHODS, f"method={name!r} is not a training method: use one of {', '.join(METHODS)}")
    return METHODS[name]


def component_of(name: str, default: str = "base") -> str:
    """What a method's artifact is (``base``, ``student``, ``filter`` ...); ``default`` for an unknown method."""
    return METHODS[name].component if name in METHODS else default


def component_attach(kind: str):
    """The ``attach(pipeline, folder, manifest)`` of the component ``kind``."""
    paths = {m.component: m.attach for m in METHODS.values() if m.attach}
    require(kind in paths, f"unknown component kind {kind!r}: this dparallel loads {', '.join(sorted(paths))}")
    return resolve(paths[kind])


def adapter_class(family: str) -> type:
    require(family in FAMILIES, f"unknown model family {family!r}: choose from {', '.join(sorted(FAMILIES))}")
    return resolve(FAMILIES[family])
