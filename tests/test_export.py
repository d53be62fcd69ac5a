"""Export: train tiny -> export -> load in a fresh process -> the same tokens; refusals are one-line errors."""

import json

import pytest
from conftest import fresh_process_tokens

import dparallel
from dparallel.cli import main
from dparallel.commands import train
from dparallel.config import load_recipe

TINY = [
    "tiny.hidden_size=32",
    "tiny.intermediate_size=64",
    "tiny.num_hidden_layers=1",
    "tiny.num_attention_heads=2",
    "train.max_steps=2",
    "train.global_batch_size=4",
    "pretrain.gen_lengths=[16]",
    "pretrain.tasks=[copy]",
    "train.num_workers=0",
    "decode.rule=confidence",
    "decode.gen_length=16",
    "decode.block_length=8",
]
PROMPTS = ["copy: abc\n", "copy: xy\n"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(load_recipe("recipes/tiny/teacher.yaml", [f"run_dir={run}", *TINY]))
    return run


def test_export_then_load_in_fresh_process_gives_same_tokens(run_dir, tmp_path, capsys):
    before = [
        g.tokens
        for g in dparallel.load(str(run_dir / "model"), device="cpu").generate(
            PROMPTS, rule="confidence", gen_length=16, block_length=8
        )
    ]
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--to", str(tmp_path / "out")])
    assert exc.value.code == 0
    manifest = json.loads((tmp_path / "out" / "dparallel.json").read_text())
    assert manifest["component"] == "base" and manifest["family"] == "tiny" and manifest["method"] == "pretrain"
    assert manifest["decoding"]["rule"] == "confidence" and manifest["ids"]["mask"] == 1
    assert "## Load" in (tmp_path / "out" / "README.md").read_text()
    # The exported folder's decoding defaults (confidence, gen 16, block 8) apply without arguments.
    assert fresh_process_tokens(tmp_path / "out", PROMPTS) == before


def test_export_refuses_non_empty_target_and_keeps_it(run_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--to", str(target)])
    assert exc.value.code == 2
    assert "not empty: pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_unreachable_hub_id_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "no-such-org/no-such-model", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "cannot get 'no-such-org/no-such-model'" in err[0]
