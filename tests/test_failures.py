"""Every failure class a user can cause is one line and exit 2, and loses nothing already written."""

import dataclasses
import errno
import json
import os
import shutil
import typing

import pytest
from conftest import assert_one_line_error, run_cli

from dparallel.adapters.folder import resolve_path
from dparallel.core import registry
from dparallel.methods.checkpoints import resume_point

TEACHER = "builtin:tiny-teacher"
TINY = [
    "tiny.hidden_size=16",
    "tiny.intermediate_size=32",
    "tiny.num_hidden_layers=1",
    "tiny.num_attention_heads=2",
    "train.global_batch_size=4",
    "train.warmup_steps=0",
    "train.checkpoint_every=1",
    "pretrain.tasks=[copy]",
]


def pretrain(run_dir, steps, capsys):
    return run_cli(
        ["train", "recipes/tiny/teacher.yaml", f"run_dir={run_dir}", f"train.max_steps={steps}", *TINY], capsys
    )


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    assert pretrain(tmp_path, 1, capsys)[0] == 0
    import dparallel.methods.checkpoints as ckpt

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / ".last.ckpt.tmp"))

    monkeypatch.setattr(ckpt.torch, "save", full)
    code, _, err = pretrain(tmp_path, 3, capsys)
    assert_one_line_error(code, err, "no space left on the device", "the last good checkpoint")
    monkeypatch.undo()
    assert resume_point(tmp_path) == (str(tmp_path / "checkpoints" / "last.ckpt"), 1)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_permission_denied_is_one_line(tmp_path, capsys, monkeypatch):
    import dparallel.commands.recipe as recipe

    def denied(cfg):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(recipe, "open_run_dir", denied)
    monkeypatch.setattr("dparallel.commands.evaluate.open_run_dir", denied)
    code, _, err = run_cli(["eval", "recipes/tiny/eval.yaml"], capsys)
    assert_one_line_error(code, err, "permission denied at", "locked", "run_dir")


def test_a_file_where_a_folder_is_expected(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(["eval", "recipes/tiny/eval.yaml", f"run_dir={tmp_path / 'afile' / 'run'}"], capsys)
    assert_one_line_error(code, err, "a file is in the way", "afile")


def test_debug_keeps_the_traceback(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError):
        run_cli(["--debug", "eval", "recipes/tiny/eval.yaml", f"run_dir={tmp_path / 'afile' / 'run'}"], capsys)


def test_a_recipe_that_is_not_a_mapping(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli(["train", str(tmp_path / "list.yaml")], capsys)
    assert_one_line_error(code, err, "is not a mapping")


def test_unreadable_weights(tmp_path, capsys):
    folder = tmp_path / "teacher"
    shutil.copytree(resolve_path(TEACHER), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(["generate", str(folder), "--prompt", "copy: ab\n"], capsys)
    assert_one_line_error(code, err, "cannot read the weights", "re-download or re-export")


def test_prompt_and_canvas_longer_than_the_model(capsys):
    code, _, err = run_cli(["generate", "--prompt", "copy: abc\n", "gen_length=320"], capsys)
    assert_one_line_error(code, err, "10 tokens + gen_length 320 = 330", "max_position_embeddings 256")


def test_unknown_characters_are_refused_or_dropped_with_lenient(capsys):
    code, _, err = run_cli(["generate", "--prompt", "copy: qwertyuiopasdfghjk\u20ac\n"], capsys)
    assert_one_line_error(code, err, "cannot represent '\u20ac'", "--lenient")
    with pytest.warns(UserWarning, match="dropped"):
        code, out, _ = run_cli(["generate", "--prompt", "copy: qwertyuiopasdfghjk\u20ac\n", "--lenient"], capsys)
    assert code == 0 and out.startswith("qwertyuiopasdfghjk\n")  # the copy of what is left


def test_generate_keeps_the_folder_decoding_defaults(tmp_path, capsys):
    folder = tmp_path / "teacher"
    shutil.copytree(resolve_path(TEACHER), folder)
    manifest = json.loads((folder / "dparallel.json").read_text())
    manifest["decoding"] = {**manifest["decoding"], "rule": "confidence", "threshold": 0.5}
    (folder / "dparallel.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(["generate", str(folder), "--prompt", "copy: abcdefghijklmnopqr\n", "--json"], capsys)
    assert code == 0 and json.loads(out)["stats"]["nfe"] < 32  # the folder's threshold rule, not topk's 32 steps


def test_warmup_longer_than_the_run(tmp_path, capsys):
    args = ["train", "recipes/tiny/teacher.yaml", f"run_dir={tmp_path}", "train.max_steps=2", "train.warmup_steps=5"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "train.warmup_steps=5 is longer than the schedule (2 steps)")
    assert not (tmp_path / "checkpoints").exists()


def test_deepspeed_on_the_cpu_names_the_strategies_that_run(tmp_path, capsys):
    args = ["train", "recipes/tiny/teacher.yaml", f"run_dir={tmp_path}", "train.strategy=deepspeed_stage_2"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "train.strategy=deepspeed_stage_2 needs a GPU", "use ddp or fsdp")


def test_written_files_are_world_readable(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert pretrain(tmp_path, 1, capsys)[0] == 0
    finally:
        os.umask(old)
    files = [p for p in [*(tmp_path / "model").iterdir(), *(tmp_path / "checkpoints").iterdir()] if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), [oct(p.stat().st_mode) for p in files]


def numeric_keys():
    """(dotted key, its declared range or None) for every int/float recipe key of every section."""
    from dparallel.commands.recipe import _resolve_types

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(f.type)) or {f.type}
            if dataclasses.is_dataclass(f.type):
                yield from walk(f.type, f"{prefix}{f.name}.")
            elif kinds & {int, float} and not kinds & {bool, str} and typing.get_origin(f.type) is not list:
                yield f"{prefix}{f.name}", f.metadata.get("range")

    for section, path in registry.SECTIONS.items():
        cls = registry.resolve(path)
        _resolve_types(cls)
        yield from walk(cls, f"{section}.")


def test_every_numeric_key_at_zero_and_minus_one(capsys):
    """Walks the schema: a value outside a key's declared range is one line naming the key; inside, the recipe
    loads (``--help`` validates without running anything)."""
    checked = 0
    for key, bounds in numeric_keys():
        for value in (0, -1):
            low, high, above, below = bounds or (None, None, False, False)
            invalid = low is not None and (value <= low if above else value < low)
            code, _, err = run_cli(["eval", f"{key}={value}", "--help"], capsys)
            if invalid:
                assert_one_line_error(code, err, f"{key}={value}")
                checked += 1
            else:
                assert code == 0, (key, value, err)
    assert checked > 100  # most keys declare a range: a count that falls means one was dropped
