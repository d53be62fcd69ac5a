"""dparallel: train the small learned parts that let diffusion language models decode many tokens per forward,
and run them in a fast sampler. ``dparallel.load(path).generate(prompts, rule=...)`` is the entry point."""

from dparallel.generator import Generation, Generator, load

__version__ = "0.1.0"
__all__ = ["Generation", "Generator", "load", "__version__"]
