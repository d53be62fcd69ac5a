"""The CLI: recipes merge over the schema; bad input is one line on stderr and exit code 2."""

import json
import shutil

from conftest import assert_one_line_error, run_cli

from dparallel.adapters.folder import resolve_path
from dparallel.cli import main
from dparallel.commands.recipe import load_recipe

TEACHER = "builtin:tiny-teacher"


def test_recipe_merges_and_overrides(tmp_path):
    cfg = load_recipe("recipes/tiny/eval.yaml", ["eval.suite.n_per_task=3", f"run_dir={tmp_path}"])
    assert cfg.eval.suite.n_per_task == 3
    assert cfg.name == "eval" and cfg.model.path == TEACHER
    assert [d.name for d in cfg.eval.decoders] == ["sequential", "confidence-0.9"]
    assert cfg.eval.decoders[1].threshold == 0.9


def test_unknown_key_suggests_the_closest(capsys):
    code, _, err = run_cli(["eval", "recipes/tiny/eval.yaml", "train.lrr=1e-4"], capsys)
    assert_one_line_error(code, err, "train.lrr", "did you mean 'train.lr'")


def test_wrong_type(capsys):
    code, _, err = run_cli(["eval", "recipes/tiny/eval.yaml", "eval.batch_size=many"], capsys)
    assert_one_line_error(code, err, "eval.batch_size")


def test_missing_recipe_file(capsys):
    code, _, err = run_cli(["eval", "recipes/tiny/nope.yaml"], capsys)
    assert_one_line_error(code, err, "recipes/tiny/nope.yaml", "not found")


def test_unknown_task_and_empty_task_list(capsys):
    code, _, err = run_cli(["eval", "recipes/tiny/eval.yaml", "eval.suite.tasks=[copy,add]"], capsys)
    assert_one_line_error(code, err, "unknown task 'add'", "choose from copy, reverse")
    code, _, err = run_cli(["eval", "recipes/tiny/eval.yaml", "eval.suite.tasks=[]"], capsys)
    assert_one_line_error(code, err, "the task list is empty")


def test_too_short_a_canvas_warns_with_the_truncated_share(capsys, tmp_path):
    args = ["eval", "recipes/tiny/eval.yaml", f"run_dir={tmp_path}", "eval.suite.tasks=[copy,sum]"]
    args += ["eval.suite.n_per_task=4", "eval.decoders=[{name: sequential, gen_length: 20, block_length: 20}]"]
    code, _, err = run_cli(args, capsys)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: gen_length=20 truncates 25% of copy's answers (longest 22 tokens): use gen_length >= 23",
        "warning: gen_length=20 truncates 50% of sum's answers (longest 28 tokens): use gen_length >= 29",
    ]


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(["generate", str(tmp_path / "absent"), "--prompt", "copy: ab\n"], capsys)
    assert_one_line_error(code, err, "absent")


def test_gen_length_not_divisible_by_block(capsys):
    args = ["generate", TEACHER, "--prompt", "copy: ab\n", "gen_length=20", "block_length=8"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "gen_length=20", "block_length=8")


def test_pad_id_equal_to_mask_id(capsys, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(resolve_path(TEACHER), folder)
    manifest = json.loads((folder / "dparallel.json").read_text())
    manifest["ids"]["pad"] = manifest["ids"]["mask"]
    (folder / "dparallel.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(["generate", str(folder), "--prompt", "copy: ab\n"], capsys)
    assert_one_line_error(code, err, "mask id 1 equals the pad id")


def test_help_lists_the_recipe_sections_with_the_recipe_values(capsys):
    code, out, _ = run_cli(["train", "recipes/tiny/teacher.yaml", "train.lr=0.004", "--help"], capsys)
    assert code == 0
    keys = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ") and "." in line}
    assert keys["train.lr"] == "0.004" and keys["pretrain.gen_lengths"] == "[32]" and keys["tiny.hidden_size"] == "192"
    assert "semi-AR block" in out  # decode.block_length's field docstring
    assert not any(k.startswith(("bench.", "sweep.", "distill.", "filter.")) for k in keys)  # not this recipe's


def test_help_without_a_recipe_lists_the_command_sections(capsys):
    code, out, _ = run_cli(["eval", "--help"], capsys)
    assert code == 0 and "eval.suite.split" in out and "train.lr" not in out


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from dparallel.cli import run; run(['train', 'recipes/tiny/distill.yaml', '--help']); "
    code += "assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("dparallel 0.")


def test_generate_prints_answer_and_stats(capsys):
    args = ["generate", TEACHER, "--prompt", "reverse: abcdefghijklmnopqr\n", "--json", "rule=confidence"]
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads(out.strip().splitlines()[-1])
    assert record["text"] == "rqponmlkjihgfedcba"
    assert record["stats"]["nfe"] >= 1 and record["stats"]["answer_tokens"] == 19  # 18 letters + EOS


def test_a_train_resume_eval_generate_export_chain_prints_no_warning(tmp_path):
    """Every stage of a normal run, each in its own process as a user runs them: nothing on stderr."""
    import subprocess
    import sys

    tiny = [
        "tiny.hidden_size=16",
        "tiny.intermediate_size=32",
        "tiny.num_hidden_layers=1",
        "tiny.num_attention_heads=2",
    ]
    train = ["train", "recipes/tiny/teacher.yaml", f"run_dir={tmp_path / 't'}", "train.warmup_steps=0", *tiny]
    model = str(tmp_path / "t" / "model")
    stages = [
        [*train, "train.max_steps=2"],
        [*train, "train.max_steps=3"],  # resumes
        [
            "eval",
            "recipes/tiny/eval.yaml",
            f"model.path={model}",
            f"run_dir={tmp_path / 'e'}",
            "eval.suite.n_per_task=2",
        ],
        ["generate", model, "--prompt", "copy: ab\n", "cache=dual"],
        ["export", str(tmp_path / "t")],
    ]
    for args in stages:
        out = subprocess.run([sys.executable, "-m", "dparallel", *args], capture_output=True, text=True)
        assert out.returncode == 0 and out.stderr == "", (args, out.stderr[-2000:])


def test_show_renders_the_decode_step_by_step(capsys):
    import dparallel
    from dparallel.commands.generate import frames

    gen = dparallel.load(TEACHER, device="cpu")
    [out] = gen.generate(["reverse: abcdefghijklmnopqr\n"], rule="topk", gen_length=32, block_length=32)
    shown = [plain for plain, _ in frames(out, gen.adapter)]
    assert len(shown) == 33 and shown[0] == "·" * 32  # all masked, then one commit per topk step
    assert shown[-1] == "rqponmlkjihgfedcba" + "∅" * 14
    assert all(sum(a != b for a, b in zip(x, y)) == 1 for x, y in zip(shown, shown[1:]))
    code, printed, _ = run_cli(["generate", "--prompt", "reverse: abcdefghijklmnopqr\n", "--show"], capsys)
    assert code == 0 and printed.count("step ") == 33 and "rqponmlkjihgfedcba" in printed


def test_quickstart_runs_every_stage_and_prints_teacher_and_student(tmp_path, capsys):
    """The README's tour at toy size: teacher eval, sequential record, distillation with the teacher's reference in
    the student's eval (the frontier's target), export; the final table has both models' rows, once each."""
    args = [
        "quickstart",
        f"run_dir={tmp_path}",
        "quickstart.record_per_task=1",
        "quickstart.distill_steps=2",
        "quickstart.distill_batch=2",
        "eval.suite.n_per_task=1",
        "eval.suite.tasks=[copy,shuffle]",
    ]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    table = out[out.index("model    decoder") :].splitlines()[1:]
    labels = [line.split()[:2] for line in table if line.startswith(("teacher ", "student "))]
    assert labels == [
        ["teacher", "sequential"],
        ["teacher", "confidence"],
        ["student", "entropy-0.5"],
        ["student", "entropy-1.0"],
        ["student", "confidence-0.9"],
    ]
    student = json.loads((tmp_path / "distill" / "eval.json").read_text())
    assert student["frontier"]["reference"] == "teacher-sequential"
    assert student["frontier"]["families"]["teacher-sequential"]["model"] == "builtin:tiny-teacher"
    records = json.loads((tmp_path / "record" / "trajectories" / "manifest.json").read_text())
    assert records["decode"]["rule"] == "topk" and records["decode"]["cache"] == "none"
    assert (tmp_path / "distill" / "export" / "dparallel.json").is_file()


def test_the_training_bar_updates_every_step_on_a_terminal_and_20_times_into_a_log(monkeypatch):
    import sys

    from dparallel.methods.base import bar_refresh_rate

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert (bar_refresh_rate(2000), bar_refresh_rate(7)) == (100, 1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert bar_refresh_rate(2000) == 1
