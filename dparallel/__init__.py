"""dparallel: train the small learned parts that let diffusion language models decode many tokens per forward,
and run them in a fast decoder. ``dparallel.load(path).generate(prompts, rule=...)`` is the entry point.

The names below load on first use, so ``import dparallel`` (and the CLI's ``--help``) does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Generation", "Pipeline", "load", "__version__"]


def __getattr__(name: str):
    if name in ("Generation", "Pipeline", "load"):
        from dparallel.engine import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dparallel' has no attribute {name!r}")
