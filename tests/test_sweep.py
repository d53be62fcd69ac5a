"""dparallel sweep: the wandb configuration, and a local grid with wandb offline."""

import json

import pytest
import yaml

from dparallel.cli import main
from dparallel.commands.recipe import load_recipe
from dparallel.commands.sweep import grid, wandb_config


def test_wandb_config_runs_dparallel_train_with_key_value_args():
    cfg = load_recipe("recipes/tiny/sweep.yaml")
    config = wandb_config(cfg, "recipes/tiny/sweep.yaml", ["train.max_steps=2"])
    assert config["command"] == [
        "${env}",
        "dparallel",
        "train",
        "recipes/tiny/sweep.yaml",
        "train.max_steps=2",  # the user's overrides reach every agent run
        "${args_no_hyphens}",
    ]
    assert config["parameters"] == {"train.lr": {"values": [1e-3, 3e-3]}, "tiny.hidden_size": {"values": [32, 64]}}
    assert config["metric"] == {"name": "train/loss", "goal": "minimize"}
    assert len(grid(cfg)) == 4


def test_local_sweep_runs_every_point_and_ranks_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "sweep",
                "recipes/tiny/sweep.yaml",
                "--local",
                f"run_dir={tmp_path}",
                "train.max_steps=2",
                "train.log_every=1",
            ]
        )
    assert exc.value.code == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    losses = [r["train/loss"] for r in report["runs"]]
    assert len(losses) == 4 and losses == sorted(losses)
    assert {(r["train.lr"], r["tiny.hidden_size"]) for r in report["runs"]} == {
        (1e-3, 32),
        (1e-3, 64),
        (3e-3, 32),
        (3e-3, 64),
    }
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "sweep.md").read_text().startswith("| run |")
    assert yaml.safe_load((tmp_path / "sweep.yaml").read_text())["method"] == "grid"
    assert any((tmp_path / report["runs"][0]["run"] / "wandb").iterdir())  # wandb ran, offline
    assert all((tmp_path / r["run"] / "train.png").is_file() for r in report["runs"])  # each point's curves


def test_agent_points_get_their_own_folders_and_the_local_table(tmp_path, monkeypatch):
    """The generated agent command, run once per grid point as wandb's agent would (WANDB_SWEEP_ID set, the
    point's key=value args), trains each point in its own folder; --collect then gives --local's table."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    user = ["train.max_steps=2", "train.log_every=1"]

    def cli(args):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0

    cli(["sweep", "recipes/tiny/sweep.yaml", "--local", f"run_dir={tmp_path / 'local'}", *user])
    local = json.loads((tmp_path / "local" / "sweep.json").read_text())["runs"]
    agent_dir = tmp_path / "agent"
    recipe = load_recipe("recipes/tiny/sweep.yaml")
    config = wandb_config(recipe, "recipes/tiny/sweep.yaml", [f"run_dir={agent_dir}", *user])
    monkeypatch.setenv("WANDB_SWEEP_ID", "test-sweep")
    for point in grid(recipe):
        args = [a for a in config["command"] if a not in ("${env}", "${args_no_hyphens}")]
        cli(args[1:] + [f"{k}={v}" for k, v in point.items()])  # args[0] is the `dparallel` program
    monkeypatch.delenv("WANDB_SWEEP_ID")
    assert len([d for d in agent_dir.iterdir() if d.is_dir()]) == 4
    cli(["sweep", "recipes/tiny/sweep.yaml", "--collect", f"run_dir={agent_dir}", *user])
    assert json.loads((agent_dir / "sweep.json").read_text())["runs"] == local


def test_wandb_run_holds_the_resolved_recipe_and_a_descriptive_name(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no login, so offline by default
    run = tmp_path / "runs" / "lr-probe"
    with pytest.raises(SystemExit) as exc:
        main(["train", "recipes/tiny/sweep.yaml", f"run_dir={run}", "train.max_steps=1", "train.lr=0.002"])
    assert exc.value.code == 0
    # the offline run file (wandb's protobuf records): its run record and the config update Lightning logged
    records = next((run / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    assert b"sweep/lr-probe" in records  # the run's name: recipe / run folder
    assert b'"lr":0.002' in records and b'"hidden_size":32' in records and b"pretrain" in records
