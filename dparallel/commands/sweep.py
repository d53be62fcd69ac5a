"""``dparallel sweep RECIPE``: the recipe's ``sweep:`` block as a wandb sweep, or run locally as a grid.

The sweep block names dotted recipe keys and their values. Without ``--local`` it is written as a wandb sweep
configuration (``RUN_DIR/sweep.yaml``) whose agents run ``dparallel train RECIPE key=value ...`` (wandb's
``${args_no_hyphens}`` expands to exactly our override syntax); with ``--local`` every grid point runs here, one
run directory each, wandb offline, and a comparison table (``sweep.md``, ``sweep.json``) and plot are written.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dparallel.commands.recipe import open_run_dir, point_name
from dparallel.core.errors import DParallelError, first_line, require
from dparallel.core.io import atomic_write_json, atomic_write_text


def wandb_config(cfg: DictConfig, recipe: str, overrides: list[str] = ()) -> dict:
    """The wandb sweep configuration of the recipe's sweep block. Its command passes the user's overrides, then the
    point's; each agent run trains in RUN_DIR/<point name> (``open_run_dir`` under ``WANDB_SWEEP_ID``)."""
    s = cfg.sweep
    require(s.method in ("grid", "random", "bayes"), f"sweep.method={s.method!r}: use grid, random or bayes")
    require(s.goal in ("minimize", "maximize"), f"sweep.goal={s.goal!r}: use minimize or maximize")
    require(len(s.parameters) > 0, "the recipe has no sweep.parameters: add dotted keys with lists of values")
    return {
        "program": "dparallel",
        "method": s.method,
        "metric": {"name": s.metric, "goal": s.goal},
        "parameters": {k: {"values": list(v)} for k, v in OmegaConf.to_container(s.parameters).items()},
        "command": ["${env}", "dparallel", "train", recipe, *overrides, "${args_no_hyphens}"],
    }


def grid(cfg: DictConfig) -> list[dict[str, Any]]:
    """Every combination of the sweep's values, as {dotted key: value}."""
    params = OmegaConf.to_container(cfg.sweep.parameters)
    keys = list(params)
    return [dict(zip(keys, values)) for values in itertools.product(*(params[k] for k in keys))]


def metric_value(run_dir: Path, metric: str) -> float:
    """Read the sweep metric from a finished run: the last logged value, or an eval.json cell."""
    if metric.startswith("eval/"):
        import json

        _, decoder, task, name = metric.split("/")
        rows = json.loads((run_dir / "eval.json").read_text())["results"]
        return next(r[name] for r in rows if r["decoder"] == decoder and r["task"] == task)
    from dparallel.core.plots import read_metrics

    series = read_metrics(run_dir)
    require(bool(series), f"no metrics logged in {run_dir}/logs")
    require(metric in series, f"metric {metric!r} was never logged in {run_dir}/logs (logged: {', '.join(series)})")
    return series[metric][-1][1]


def run_local(cfg: DictConfig, recipe: str, overrides: list[str]) -> list[dict]:
    """Run every grid point with ``train`` (wandb offline); write sweep.json, sweep.md and sweep.png."""
    from dparallel.commands.recipe import load_recipe
    from dparallel.commands.train import train

    os.environ.setdefault("WANDB_MODE", "offline")
    base = Path(cfg.run_dir)
    for i, point in enumerate(grid(cfg)):
        point_overrides = [*overrides, f"run_dir={base / point_name(point)}", *(f"{k}={v}" for k, v in point.items())]
        print(f"sweep point {i + 1}: {point}", flush=True)
        train(load_recipe(recipe, point_overrides))
    return collect(cfg)


def collect(cfg: DictConfig) -> list[dict]:
    """The table of a finished sweep, read from its point folders (run here or by wandb agents): one row per grid
    point, best first; sweep.json, sweep.md and sweep.png in RUN_DIR."""
    base = Path(cfg.run_dir)
    results = []
    for point in grid(cfg):
        name = point_name(point)
        require((base / name).is_dir(), f"sweep point {name} has no run folder in {base}: run its agent first")
        results.append({"run": name, **point, cfg.sweep.metric: metric_value(base / name, cfg.sweep.metric)})
    results.sort(key=lambda r: r[cfg.sweep.metric], reverse=cfg.sweep.goal == "maximize")
    atomic_write_json(base / "sweep.json", {"metric": cfg.sweep.metric, "goal": cfg.sweep.goal, "runs": results})
    atomic_write_text(base / "sweep.md", table(results))
    plot(results, cfg.sweep.metric, cfg.sweep.goal, base / "sweep.png", f"sweep {cfg.name}")
    return results


def table(results: list[dict]) -> str:
    keys = list(results[0])
    return (
        "| "
        + " | ".join(keys)
        + " |\n|"
        + "---|" * len(keys)
        + "\n"
        + "".join(
            "| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |\n"
            for r in results
        )
    )


def plot(results: list[dict], metric: str, goal: str, out: Path, title: str) -> None:
    """sweep.png: one bar per grid point (its run folder's name), best at the top, the metric's axis from 0."""
    from dparallel.core.plots import new_figure, save_figure

    fig, axes = new_figure(6, 1.5 + 0.35 * len(results))
    ax = axes[0, 0]
    ax.barh([r["run"] for r in results][::-1], [r[metric] for r in results][::-1])
    ax.set_xlabel(f"{metric} ({goal})")
    ax.set_xlim(left=0)
    ax.set_title(f"{title}: {len(results)} points", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, out)


def sweep(cfg: DictConfig, recipe: str, overrides: list[str], local: bool, collect_only: bool = False) -> None:
    """Write RUN_DIR/sweep.yaml (the wandb sweep); with ``local`` run the grid here and print the table; with
    ``collect_only`` print the table of points the agents have run."""
    run_dir = open_run_dir(cfg)
    config = wandb_config(cfg, recipe, overrides)
    atomic_write_text(run_dir / "sweep.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    if local or collect_only:
        results = run_local(cfg, recipe, overrides) if local else collect(cfg)
        print(table(results) + f"\nreport: {run_dir / 'sweep.md'}", flush=True)
        return
    import wandb

    try:
        sweep_id = wandb.sweep(config, project=cfg.train.wandb_project)
    except Exception as e:  # offline, no login: the configuration is still on disk
        raise DParallelError(
            f"wrote {run_dir / 'sweep.yaml'} but could not create the wandb sweep ({first_line(e)}): "
            f"run `wandb sweep {run_dir / 'sweep.yaml'}` when online, or use --local"
        ) from None
    print(f"created sweep {sweep_id}; start agents with: wandb agent {cfg.train.wandb_project}/{sweep_id}")
