"""``dparallel quickstart METHOD``: one method's whole chain on the embedded default, into ``run_dir``.

(record the teacher's trajectories, when the method learns from them →) train → the after-train eval with the
frontier (the method's points beside their baseline, one run, the same prompts) → export, then the final table.
These are the commands a reviewer runs to check a method's measured numbers (docs/methods/METHOD.md); the plain
``dparallel quickstart`` stays the short tour. ``METHOD`` names the tiny recipe ``recipes/tiny/METHOD.yaml``, and
any ``key=value`` after it overrides that recipe (``train.max_steps=50`` for a smoke run).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dparallel.commands.frontier import frontier_table
from dparallel.commands.recipe import load_recipe
from dparallel.core.paths import recipes_dir


@dataclass(frozen=True)
class Chain:
    """What runs before a method's training."""

    record: str | None = None
    """the tiny recipe that records the trajectories it learns from (None: it trains on the suite directly)"""
    trajectories_key: str = ""
    """the method's recipe key that names the trajectory folder"""


CHAINS = {
    "ar2diff": Chain(),
    "distill": Chain(record="record-seq.yaml", trajectories_key="distill.trajectories"),
    "filter": Chain(record="record-features.yaml", trajectories_key="filter.trajectories"),
    "joint": Chain(record="record-sequential.yaml", trajectories_key="joint.trajectories"),
    "policy": Chain(),
}


def chain_recipe(name: str) -> str:
    """The tiny recipe of a chain name (``dparallel quickstart distill`` -> recipes/tiny/distill.yaml)."""
    return str(recipes_dir() / "tiny" / f"{name}.yaml")


def run_chain(cfg: DictConfig) -> dict:
    """Run ``cfg.method``'s chain into ``cfg.run_dir``; print the final table; return the eval report."""
    from dparallel.commands.export import export_run
    from dparallel.commands.train import train
    from dparallel.data.record import record

    chain, run_dir, start = CHAINS[cfg.method], Path(cfg.run_dir), time.perf_counter()
    stages = ["train", "eval", "export"] if chain.record is None else ["record", "train", "eval", "export"]
    print(f"dparallel quickstart {cfg.method}: {' -> '.join(stages)} under {run_dir}", flush=True)
    if chain.record is not None:
        recorder = load_recipe(
            str(recipes_dir() / "tiny" / chain.record),
            [f"run_dir={run_dir / 'record'}", f"model.path={cfg.model.path}"],
            command="record",
        )
        OmegaConf.update(cfg, chain.trajectories_key, str(record(recorder)))
    cfg.eval.after_train = True  # the report sits beside the model, and the export carries it
    train(cfg)
    report = json.loads((run_dir / "eval.json").read_text())
    exported = export_run(run_dir, overwrite=True)
    print("\n" + macro_table(report) + "\n" + (frontier_table(report) if report.get("frontier") else ""))
    print(f"done in {time.perf_counter() - start:.0f}s. Report: {run_dir / 'eval.md'}; exported: {exported}")
    return report


def macro_table(report: dict) -> str:
    """One line per decoder: macro accuracy (95% interval), NFE, TPF and milliseconds per answer."""
    head = f"{'decoder':<24} {'accuracy':>8} {'95% CI':>13} {'NFE':>6} {'TPF':>6} {'ms/answer':>10}\n"
    return head + "".join(
        f"{r['decoder']:<24} {r['accuracy']:>8.3f} {r['ci95'][0]:>6.3f}-{r['ci95'][1]:<6.3f} {r['nfe']:>6.1f} "
        f"{r['tpf']:>6.2f} {1000 * r['wall_s'] / r['n']:>10.1f}\n"
        for r in report["results"]
        if r["task"] == "macro"
    )
