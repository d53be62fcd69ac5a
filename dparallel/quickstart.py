"""``dparallel quickstart``: the pipeline on the embedded default (the shipped tiny teacher and the synthetic
suite), on CPU in minutes. Each stage writes its usual files under ``run_dir/<stage>``."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dparallel.commands import evaluate_recipe


def _stage(cfg: DictConfig, stage: str) -> DictConfig:
    """A copy of the recipe whose run_dir is run_dir/<stage>."""
    sub = OmegaConf.create(OmegaConf.to_container(cfg))
    sub.run_dir = str(Path(cfg.run_dir) / stage)
    return sub


def quickstart(cfg: DictConfig) -> dict:
    """Evaluate the shipped teacher with the reference decoders and print where the report is."""
    start = time.perf_counter()
    print(f"dparallel quickstart: teacher {cfg.model.path}, outputs under {cfg.run_dir}", flush=True)
    report = evaluate_recipe(_stage(cfg, "teacher-eval"))
    macro = [r for r in report["results"] if r["task"] == "macro"]
    print("\ndecoder          accuracy    NFE    TPF")
    for r in macro:
        print(f"{r['decoder']:<16} {r['accuracy']:>8.3f} {r['nfe']:>6.1f} {r['tpf']:>6.2f}")
    print(f"\ndone in {time.perf_counter() - start:.0f}s; report: {Path(cfg.run_dir) / 'teacher-eval' / 'eval.md'}")
    return report
