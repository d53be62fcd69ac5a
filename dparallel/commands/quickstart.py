"""``dparallel quickstart``: the whole pipeline on the embedded default (the shipped tiny teacher and the synthetic
suite), on CPU in minutes: evaluate the teacher -> record its trajectories -> certainty-forcing distillation (the
student is evaluated when training ends) -> export it. Each stage writes its usual files under ``run_dir/<stage>``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dparallel.commands.evaluate import evaluate_recipe
from dparallel.commands.recipe import load_recipe
from dparallel.commands.train import train
from dparallel.core.paths import recipes_dir


def _tiny_stage(cfg: DictConfig, stage: str, recipe: str, overrides: list[str]) -> DictConfig:
    """A tiny recipe with run_dir = run_dir/<stage>, the quickstart's model and the given overrides."""
    base = [f"run_dir={Path(cfg.run_dir) / stage}", f"model.path={cfg.model.path}"]
    return load_recipe(str(recipes_dir() / "tiny" / recipe), base + overrides)


def _macro(report: dict, model: str, skip: tuple[str, ...] = ()) -> list[dict]:
    """The report's macro rows, labelled ``model``, but for the decoders in ``skip``."""
    return [{**r, "model": model} for r in report["results"] if r["task"] == "macro" and r["decoder"] not in skip]


def _distill_stage(cfg: DictConfig, trajectories) -> DictConfig:
    """The distillation recipe on the recorded trajectories. The train command evaluates the student itself
    (eval.after_train), so its run folder, and the export made from it, carry the eval table."""
    q = cfg.quickstart
    distill = _tiny_stage(
        cfg,
        "distill",
        "distill.yaml",
        [
            f"distill.trajectories={trajectories}",
            f"train.max_steps={q.distill_steps}",
            f"train.global_batch_size={q.distill_batch}",
            f"train.warmup_steps={min(5, q.distill_steps)}",
            "eval.after_train=true",
            f"eval.batch_size={cfg.eval.batch_size}",
            f"eval.suite.n_per_task={cfg.eval.suite.n_per_task}",
        ],
    )
    template = OmegaConf.to_container(cfg.eval.decoders[0])
    # the teacher's reference in the same run (the frontier's target), then the student under its rules
    reference = {**template, "name": f"teacher-{template['name']}", "model": cfg.model.path}
    decoders = [reference] + [
        {**template, "name": f"{rule}-{t}", "rule": rule, "threshold": float(t), "kind": "method"}
        for rule, t in (d.split(":") for d in q.student_decoders)
    ]
    # typed: each becomes a DecoderSpec
    return OmegaConf.merge(distill, {"eval": {"decoders": decoders, "reference": reference["name"]}})


def quickstart(cfg: DictConfig) -> list[dict]:
    """Run every stage and print the before/after table; returns its macro rows. A method's recipe (``dparallel
    quickstart METHOD``) runs that method's chain instead (:func:`dparallel.commands.chains.run_chain`)."""
    if cfg.method:
        from dparallel.commands.chains import run_chain

        return [r for r in run_chain(cfg)["results"] if r["task"] == "macro"]
    from dparallel.commands.export import export_run
    from dparallel.data.record import record

    q, run_dir, start = cfg.quickstart, Path(cfg.run_dir), time.perf_counter()
    print(f"dparallel quickstart: teacher {cfg.model.path}, outputs under {run_dir}", flush=True)

    print("\n[1/4] teacher: one token per step (sequential) and the confidence threshold", flush=True)
    teacher = OmegaConf.create(OmegaConf.to_container(cfg))
    teacher.run_dir = str(run_dir / "teacher-eval")
    rows = _macro(evaluate_recipe(teacher), "teacher")

    print(f"\n[2/4] record the teacher's trajectories ({q.record_per_task} prompts per task)", flush=True)
    trajectories = record(
        _tiny_stage(
            cfg,
            "record",
            "record.yaml",
            # no cache: the dual cache keeps the prompt's keys from the all-masked canvas of a one-block
            # answer, which costs this small teacher its many-answers tasks (docs/teacher.md)
            [
                f"record.source.suite.n_per_task={q.record_per_task}",
                f"decode.rule={q.record_rule}",
                "decode.cache=none",
            ],
        )
    )

    print(f"\n[3/4] certainty-forcing distillation ({q.distill_steps} steps), then the student's eval", flush=True)
    distill = _distill_stage(cfg, trajectories)
    train(distill)
    report = json.loads((run_dir / "distill" / "eval.json").read_text())
    rows += _macro(report, "student", skip=(distill.eval.reference,))  # the teacher's row is in its own report

    print("\n[4/4] export", flush=True)
    exported = export_run(run_dir / "distill", overwrite=True)

    print("\nmodel    decoder          accuracy    NFE    TPF")
    for r in rows:
        print(f"{r['model']:<8} {r['decoder']:<16} {r['accuracy']:>8.3f} {r['nfe']:>6.1f} {r['tpf']:>6.2f}")
    print(
        f"\ndone in {time.perf_counter() - start:.0f}s. Reports: {run_dir / 'teacher-eval' / 'eval.md'}, "
        f"{run_dir / 'distill' / 'eval.md'}; exported student: {exported}",
        flush=True,
    )
    return rows
