"""Every tiny training recipe runs under a 2-process torchrun on CPU (gloo)."""

from pathlib import Path

import pytest
from conftest import run_dparallel

TINY = ["tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_hidden_layers=1", "tiny.num_attention_heads=2"]
FIXTURE = Path(__file__).parent / "fixtures" / "trajectories-tiny"  # 4 records, gen 16, block 8, dense features
RECIPES = {
    "teacher": [
        "recipes/tiny/teacher.yaml",
        *TINY,
        "pretrain.gen_lengths=[32]",
        "pretrain.tasks=[copy]",
        "train.num_workers=0",
    ],
    "ar": ["recipes/tiny/ar.yaml", *TINY, "ar.init=scratch", "ar.gen_lengths=[32]", "ar.tasks=[copy]"],
    "ar2diff": [
        "recipes/tiny/ar2diff.yaml",
        "ar2diff.gen_lengths=[32]",
        "ar2diff.tasks=[copy]",
        "ar2diff.parent_prompts=4",
        "ar2diff.block_size=8",
        "eval.after_train=false",
    ],
    "filter": [
        "recipes/tiny/filter.yaml",
        f"filter.trajectories={FIXTURE}",
        "filter.features=[conf,mask,step]",  # the fixture predates the entropy/margin columns
        "filter.block_length=8",
        "filter.val_fraction=0.25",
        "decode.gen_length=32",
        "decode.block_length=8",
    ],
    "joint": [
        "recipes/tiny/joint.yaml",
        f"joint.trajectories={Path(__file__).parent / 'fixtures' / 'trajectories-sequential'}",
        "joint.val_windows=8",
    ],
    "policy": [
        "recipes/tiny/policy.yaml",
        "policy.source.suite.tasks=[copy]",
        "policy.gen_length=16",
        "policy.block_length=16",
        "policy.group_size=2",
        "decode.gen_length=32",
        "decode.block_length=16",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_two_process_torchrun_trains_and_saves(name, tmp_path):
    recipe, *overrides = RECIPES[name]
    proc = run_dparallel(
        [
            "train",
            recipe,
            *overrides,
            f"run_dir={tmp_path}",
            "train.max_steps=2",
            "train.schedule_steps=16000",  # longer than every tiny recipe's warm-up: the same first-step lrs
            "train.global_batch_size=4",
            "train.log_every=1",
        ],
        nproc=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model" / "dparallel.json").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "trained" in proc.stdout  # rank 0 reports once
