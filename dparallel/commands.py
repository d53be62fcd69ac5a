"""What each CLI command does, given a resolved recipe."""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dparallel.config import load_recipe, save_recipe
from dparallel.engine.sampler import DecodeConfig
from dparallel.errors import DParallelError, first_line, require
from dparallel.generator import Generator, load


def _run_dir(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _is_rank_zero() -> bool:
    import os

    return int(os.environ.get("RANK", 0)) == 0


def train(cfg: DictConfig) -> Path:
    """Fit the recipe's method; resume from RUN_DIR/checkpoints/last.ckpt when present; save RUN_DIR/model."""
    import lightning as L

    from dparallel.methods import METHODS
    from dparallel.training import build_trainer, check_resume, micro_batch, resume_point

    require(cfg.method in METHODS, f"method={cfg.method!r} is not a training method: use one of {', '.join(METHODS)}")
    method = METHODS[cfg.method]
    run_dir = _run_dir(cfg)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    micro, accumulate = micro_batch(cfg)
    ckpt, done_steps = resume_point(run_dir)
    start_batch = done_steps * accumulate
    if ckpt is not None:  # before config.yaml is overwritten: it names the recipe the run started with
        check_resume(run_dir, cfg, ckpt)
    module, loader = method.build(cfg, micro, start_batch)
    if ckpt is not None:
        check_resume(run_dir, cfg, ckpt, module)
        print(f"resuming from {ckpt} (step {done_steps})", flush=True)
    if _is_rank_zero():
        save_recipe(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt)
    # The final state too, so a rerun with a larger train.max_steps continues instead of repeating steps.
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if cfg.train.wandb:  # close the wandb run: the next train in this process (a sweep point) gets its own
        import wandb

        wandb.finish()
    if trainer.is_global_zero:
        method.save(module, cfg, run_dir / "model")
        from dparallel.plots import training_curves

        training_curves(run_dir)  # RUN_DIR/train.png: the loss (and every other logged metric) against the step
        print(
            f"trained {cfg.method} for {trainer.global_step} steps in {time.perf_counter() - start:.0f}s; "
            f"model saved to {run_dir / 'model'}",
            flush=True,
        )
        if cfg.eval.after_train:
            evaluate_into(cfg, run_dir, str(run_dir / "model"))
    return run_dir / "model"


def evaluate_recipe(cfg: DictConfig, generator: Generator | None = None) -> dict:
    """Run the recipe's eval section on ``model.path`` (or the given generator); write the reports."""
    run_dir = _run_dir(cfg)
    save_recipe(cfg, run_dir)
    return evaluate_into(cfg, run_dir, cfg.model.path, generator)


def evaluate_into(cfg: DictConfig, run_dir: Path, model_path: str, generator: Generator | None = None) -> dict:
    """Evaluate ``model_path`` with the recipe's eval section; write eval.json/.md/pareto.png into ``run_dir``."""
    from dparallel.data.suite import validate_tasks
    from dparallel.evaluate import SPEC_ONLY, decoder_points, evaluate, write_report
    from dparallel.frontier import frontier

    validate_tasks(list(cfg.eval.suite.tasks))  # fail before loading any weights
    for spec in cfg.eval.decoders:
        DecodeConfig(**{k: v for k, v in OmegaConf.to_container(spec).items() if k not in SPEC_ONLY}).validate()
    generator = generator or load(
        model_path, family=cfg.model.family, device=cfg.model.device, dtype=_dtype(cfg), revision=cfg.model.revision
    )
    suite = cfg.eval.suite
    print(f"evaluating {model_path} on {len(suite.tasks)} tasks x {suite.n_per_task} ({suite.split} split)", flush=True)

    def load_model(path: str) -> Generator:
        return load(path, device=cfg.model.device, dtype=_dtype(cfg))

    rows = evaluate(generator, cfg.eval, load_model=load_model)
    points = decoder_points(cfg.eval, model_path)
    section = None
    if any(p["name"] == cfg.eval.reference for p in points):  # no reference decoder, no target to read at
        section = frontier(rows, points, cfg.eval.reference, cfg.eval.margin, model_path)
    report = write_report(run_dir, model_path, f"suite/{suite.split}", rows, section, plot=cfg.eval.plot)
    print(f"report: {run_dir / 'eval.md'}", flush=True)
    return report


def _dtype(cfg: DictConfig) -> str | None:
    """None lets ``load`` choose: bfloat16 on GPU, float32 on CPU."""
    return None if cfg.model.dtype == "auto" else cfg.model.dtype


def generate(cfg: DictConfig, prompts: list[str], as_json: bool = False) -> list:
    """Decode prompts with the recipe's decode section; print text (or JSON lines with stats)."""
    require(len(prompts) > 0, "no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    DecodeConfig(**OmegaConf.to_container(cfg.decode)).validate()  # fail before loading any weights
    gen = load(
        cfg.model.path, family=cfg.model.family, device=cfg.model.device, dtype=_dtype(cfg), revision=cfg.model.revision
    )
    outs = gen.generate(prompts, **OmegaConf.to_container(cfg.decode))
    for o in outs:
        if as_json:
            print(json.dumps({"prompt": o.prompt, "text": o.text, "stats": o.stats.to_dict()}))
        else:
            print(f"{o.text}\n  [NFE {o.stats.nfe}, TPF {o.stats.tpf:.2f}, {o.stats.tokens_per_s:.0f} tok/s]")
    return outs


def bench(cfg: DictConfig) -> dict:
    """Run the recipe's bench section; write RUN_DIR/bench.json and RUN_DIR/bench.md."""
    from dparallel.bench import BenchConfig, markdown, random_shape_adapter, run_bench
    from dparallel.generator import pick_device
    from dparallel.io import atomic_write_json, atomic_write_text

    run_dir = _run_dir(cfg)
    save_recipe(cfg, run_dir)
    bench_cfg = BenchConfig(**OmegaConf.to_container(cfg.bench))
    if bench_cfg.shape:
        adapter = random_shape_adapter(bench_cfg.shape, pick_device(cfg.model.device))
    else:
        adapter = load(cfg.model.path, family=cfg.model.family, device=cfg.model.device, dtype=_dtype(cfg)).adapter
    print(f"bench: {adapter.name} on {adapter.device}", flush=True)
    report = run_bench(adapter, bench_cfg)
    if bench_cfg.train_step:  # last: it wraps the model in LoRA
        from dparallel.bench import train_step_row

        report["train_step"] = row = train_step_row(adapter, bench_cfg, load_recipe(bench_cfg.train_recipe))
        print(
            f"  train step {row['step_ms']:.0f} ms, {row['tokens_per_s']:.0f} tok/s, MFU {row['mfu']:.3f}", flush=True
        )
    atomic_write_json(run_dir / "bench.json", report)
    atomic_write_text(run_dir / "bench.md", markdown(report))
    print(f"report: {run_dir / 'bench.json'}", flush=True)
    return report


def sweep(cfg: DictConfig, recipe: str, overrides: list[str], local: bool) -> None:
    """Write RUN_DIR/sweep.yaml (the wandb sweep); with ``local`` run the grid here and print the table."""
    from dparallel import sweep as sweeps
    from dparallel.io import atomic_write_text

    run_dir = _run_dir(cfg)
    config = sweeps.wandb_config(cfg, recipe)
    atomic_write_text(run_dir / "sweep.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    if local:
        results = sweeps.run_local(cfg, recipe, overrides)
        print(sweeps.table(results) + f"\nreport: {run_dir / 'sweep.md'}", flush=True)
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


def record(cfg: DictConfig) -> Path:
    """Record the teacher's trajectories over the recipe's prompt source (see ``dparallel.data.record``)."""
    from dparallel.data.record import record as record_trajectories

    return record_trajectories(cfg)


def inspect_data(path: str, samples: int = 1) -> None:
    """Print counts, correctness, step/TPF histograms and samples of a trajectory folder."""
    from dparallel.data.inspect import inspect

    print(inspect(path, samples=samples), flush=True)
