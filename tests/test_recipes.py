"""Every shipped recipe validates against the schema and opens with what a user needs before launching it: the
command, where it runs (CPU, or the GPU memory it needs) and what it downloads."""

from pathlib import Path

import pytest

from dparallel.commands.recipe import load_recipe

RECIPES = sorted(Path("recipes").glob("*/*.yaml"))


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


@pytest.mark.parametrize("path", RECIPES, ids=[str(p) for p in RECIPES])
def test_recipe_validates_and_states_how_to_launch_it(path):
    cfg = load_recipe(str(path))  # an unknown key or a wrong type would raise here
    assert cfg.name
    text = header(path)
    assert "dparallel " in text or "torchrun" in text, f"{path}: no launch line in its header"
    if path.parent.name == "tiny":
        assert "CPU" in text or "GPU" in text, f"{path}: say where it runs"
    else:
        assert "GB" in text and "GPU" in text, f"{path}: state its GPU memory need"
        assert "download" in text.lower(), f"{path}: state what it downloads (or that it downloads nothing)"


def test_every_method_has_a_tiny_cpu_twin():
    from dparallel.core.registry import METHODS

    methods = {load_recipe(str(p)).method for p in RECIPES if p.parent.name == "tiny"}
    assert set(METHODS) <= methods
