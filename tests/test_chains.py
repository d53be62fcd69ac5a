"""``dparallel quickstart METHOD``: a method's whole chain (record -> train -> eval with the frontier -> export) at
toy size, and the one-line errors around it."""

import json
from pathlib import Path

from conftest import assert_one_line_error, run_cli

from dparallel.commands import chains

TOY_EVAL = ["eval.suite.n_per_task=1", "eval.suite.tasks=[copy,shuffle]", "eval.plot=false"]
TOY_TRAIN = ["train.max_steps=2", "train.global_batch_size=2", "train.warmup_steps=1", "train.log_every=1"]


def decoders_of(table: str) -> list[str]:
    """The decoder column of the chain's final table (the lines between its header and the frontier)."""
    lines = table[table.index("decoder ") :].split("\n\n")[0].splitlines()[1:]
    return [line.split()[0] for line in lines]


def run_small_chain(method: str, tmp_path: Path, capsys, monkeypatch) -> tuple[Path, str]:
    """Run ``quickstart METHOD`` at toy size, its record stage cut to 1 prompt per task (the shipped ones record
    300); returns the run folder and stdout after asserting the chain succeeded."""
    chain = chains.CHAINS[method]
    small = tmp_path / "record-small.yaml"
    shipped = (Path(chains.recipes_dir()) / "tiny" / chain.record).read_text()
    small.write_text(shipped.replace("n_per_task: 300", "n_per_task: 1"))
    monkeypatch.setitem(chains.CHAINS, method, chains.Chain(str(small), chain.trajectories_key))
    run = tmp_path / "run"
    code, out, _ = run_cli(["quickstart", method, f"run_dir={run}", *TOY_TRAIN, *TOY_EVAL], capsys)
    assert code == 0
    return run, out


def test_ar2diff_chain_converts_the_shipped_parent_and_evaluates_both_in_one_run(tmp_path, capsys):
    toy = ["ar2diff.tasks=[copy]", "ar2diff.parent_prompts=4"]
    args = ["quickstart", "ar2diff", f"run_dir={tmp_path}", *toy, *TOY_TRAIN, *TOY_EVAL]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert "dparallel quickstart ar2diff: train -> eval -> export" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    recipe_decoders = [r["decoder"] for r in report["results"] if r["task"] == "macro"]
    assert decoders_of(out) == recipe_decoders and recipe_decoders[0] == "ar-greedy" and len(recipe_decoders) == 13
    assert report["frontier"]["reference"] == "ar-greedy"
    parent = report["frontier"]["families"]["ar-greedy"]
    assert (parent["kind"], parent["model"]) == ("reference", "builtin:tiny-ar")
    assert report["frontier"]["families"]["confidence@block8"]["kind"] == "method"
    exported = json.loads((tmp_path / "export" / "dparallel.json").read_text())
    assert (exported["family"], exported["method"]) == ("block", "ar2diff")


def test_distill_chain_records_then_trains_on_its_records(tmp_path, capsys, monkeypatch):
    """The distill chain with a 1-prompt-per-task record stage (the shipped one records 300)."""
    run, out = run_small_chain("distill", tmp_path, capsys, monkeypatch)
    assert "record -> train -> eval -> export" in out
    manifest = json.loads((run / "record" / "trajectories" / "manifest.json").read_text())
    assert manifest["decode"]["rule"] == "topk" and manifest["decode"]["cache"] == "none"
    saved = (run / "config.yaml").read_text()
    assert f"trajectories: {run / 'record' / 'trajectories'}" in saved
    assert decoders_of(out)[0] == "teacher-sequential" and (run / "export" / "dparallel.json").is_file()


def test_filter_chain_records_dense_features_and_traces_the_filter_beside_the_heuristics(tmp_path, capsys, monkeypatch):
    """The filter chain with a 1-prompt-per-task record stage: one token per step with dense features, then the
    filter at several thresholds beside the teacher's reference, the oracle and the heuristics, in one run."""
    run, out = run_small_chain("filter", tmp_path, capsys, monkeypatch)
    assert "dparallel quickstart filter: record -> train -> eval -> export" in out
    manifest = json.loads((run / "record" / "trajectories" / "manifest.json").read_text())
    assert manifest["record"]["features"] is True and manifest["decode"]["rule"] == "topk"
    assert decoders_of(out)[:2] == ["sequential", "oracle"] and "filter-0.99-eotp" in decoders_of(out)
    families = json.loads((run / "eval.json").read_text())["frontier"]["families"]
    assert (families["oracle"]["kind"], families["confidence"]["kind"], families["filter"]["kind"]) == (
        "oracle", "heuristic", "method"
    )  # fmt: skip
    assert len(families["filter"]["points"]) == 7
    exported = json.loads((run / "export" / "dparallel.json").read_text())
    assert (exported["component"], exported["decoding"]["rule"]) == ("filter", "filter")


def test_joint_chain_records_exact_sequential_trajectories_and_trains_the_layer_on_them(tmp_path, capsys, monkeypatch):
    """The joint chain with a 1-prompt-per-task record stage: its records commit one token per forward by entropy
    (what the layer's training refuses otherwise), and the eval puts joint beside marginal at the same k."""
    run, out = run_small_chain("joint", tmp_path, capsys, monkeypatch)
    assert "dparallel quickstart joint: record -> train -> eval -> export" in out
    manifest = json.loads((run / "record" / "trajectories" / "manifest.json").read_text())
    assert (manifest["decode"]["rule"], manifest["decode"]["k"], manifest["decode"]["cache"]) == ("marginal", 1, "none")
    assert decoders_of(out) == [
        "sequential", "marginal-k2", "marginal-k4", "marginal-k8", "joint-k2", "joint-k4", "joint-k8"
    ]  # fmt: skip
    report = json.loads((run / "eval.json").read_text())
    assert set(report["frontier"]["families"]) == {"sequential", "marginal", "joint"}
    exported = json.loads((run / "export" / "dparallel.json").read_text())
    assert (exported["component"], exported["k"]) == ("joint", 4)


def test_policy_chain_trains_on_the_suite_and_traces_both_curves_in_one_run(tmp_path, capsys):
    toy = ["policy.source.suite.tasks=[copy]", "policy.group_size=2", "eval.suite.tasks=[copy]"]
    code, out, _ = run_cli(["quickstart", "policy", f"run_dir={tmp_path}", *TOY_TRAIN, *TOY_EVAL, *toy], capsys)
    assert code == 0
    assert "dparallel quickstart policy: train -> eval -> export" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    families = report["frontier"]["families"]
    assert set(families) == {"sequential", "confidence", "policy", "confidence@b16", "policy@b16"}
    assert len(families["policy"]["points"]) == 8 and families["policy"]["kind"] == "method"
    exported = json.loads((tmp_path / "export" / "dparallel.json").read_text())
    assert (exported["component"], exported["trained"]["gen_length"]) == ("policy", 32)


def test_an_unknown_chain_is_one_line(capsys):
    code, _, err = run_cli(["quickstart", "distil"], capsys)
    assert_one_line_error(code, err, "no quickstart chain 'distil'", "ar2diff, distill")


def test_a_missing_parent_names_the_recipe_that_makes_it(tmp_path, capsys, monkeypatch):
    """Instead of a Hub error: the folder, and the shipped recipe whose training writes it."""
    recipe = str(Path(chains.recipes_dir()) / "tiny" / "ar2diff.yaml")
    monkeypatch.chdir(tmp_path)  # no runs/ here
    code, _, err = run_cli(["train", recipe, "model.path=runs/ar/model"], capsys)
    assert_one_line_error(
        code, err, "model folder runs/ar/model does not exist", "dparallel train recipes/tiny/ar.yaml"
    )
    code, _, err = run_cli(["train", recipe, "model.path=./my/parent"], capsys)
    assert_one_line_error(code, err, "model folder ./my/parent does not exist", "set model.path")
    code, _, err = run_cli(["train", recipe, "model.path=builtin:tiny-parent"], capsys)
    assert_one_line_error(code, err, "no built-in model 'builtin:tiny-parent'", "builtin:tiny-ar, builtin:tiny-teacher")
