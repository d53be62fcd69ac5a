"""dparallel sweep: the wandb configuration, and a local grid with wandb offline."""

import json

import pytest
import yaml

from dparallel.cli import main
from dparallel.commands.recipe import load_recipe
from dparallel.commands.sweep import grid, wandb_config


def test_wandb_config_runs_dparallel_train_with_key_value_args():
    cfg = load_recipe("recipes/tiny/sweep.yaml")
    config = wandb_config(cfg, "recipes/tiny/sweep.yaml")
    assert config["command"] == ["${env}", "dparallel", "train", "recipes/tiny/sweep.yaml", "${args_no_hyphens}"]
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
