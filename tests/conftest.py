"""Shared test helpers: tiny model shapes and the CLI runner."""

import pytest
import torch

from dparallel.cli import main


def tiny_shape(hidden: int = 64, layers: int = 2) -> dict:
    """The `tiny` section of a random test model (stock Llama, bidirectional): seconds to build and run on CPU."""
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )


def run_cli(args, capsys):
    """Run ``dparallel ARGS``; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    """Bad input: exit code 2 and one line ``dparallel: error: ...`` naming every needle, no traceback."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dparallel: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on 2 shared cores a second thread makes tiny matmuls slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_dparallel(args: list[str], nproc: int = 1, timeout: int = 300):
    """``dparallel ARGS`` in a subprocess, under ``torch.distributed.run`` (gloo, standalone) when nproc > 1."""
    import os
    import subprocess
    import sys

    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, *launcher, "-m", "dparallel", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def fresh_process_tokens(folder, prompts: list[str], **decode) -> list[list[int]]:
    """``dparallel.load(folder).generate(prompts, **decode)`` in a new Python process: the canvas tokens of each
    answer. What an exported folder gives a user who has nothing but the folder."""
    import json
    import subprocess
    import sys

    code = (
        f"import dparallel, json; g = dparallel.load({str(folder)!r}, device='cpu'); "
        f"print(json.dumps([o.tokens for o in g.generate({prompts!r}, **{decode!r})]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def teacher():
    """The embedded tiny teacher as a generator, loaded once per test module."""
    import dparallel

    return dparallel.load("builtin:tiny-teacher", device="cpu")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA: skipped (with the reason) where there is none, as on CI."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run bench/device.sh on a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
