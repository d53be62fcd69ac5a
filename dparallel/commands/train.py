"""``dparallel train RECIPE``: fit the recipe's method, resume a killed run, save and evaluate the model."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from dparallel.commands.evaluate import evaluate_into
from dparallel.commands.recipe import open_run_dir
from dparallel.core import registry
from dparallel.core.io import save_recipe
from dparallel.core.runtime import is_rank_zero


def train(cfg: DictConfig) -> Path:
    """Fit the recipe's method; resume from RUN_DIR/checkpoints/last.ckpt when present; save RUN_DIR/model."""
    import lightning as L

    from dparallel.methods.base import build_trainer, check_resume, micro_batch
    from dparallel.methods.checkpoints import resume_point

    method = registry.method(cfg.method)
    run_dir = open_run_dir(cfg)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    micro, accumulate = micro_batch(cfg)
    ckpt, done_steps = resume_point(run_dir)
    start_batch = done_steps * accumulate
    if ckpt is not None:  # before config.yaml is overwritten: it names the recipe the run started with
        check_resume(run_dir, cfg, ckpt)
    module, loader = registry.resolve(method.build)(cfg, micro, start_batch)
    if ckpt is not None:
        check_resume(run_dir, cfg, ckpt, module)
        print(f"resuming from {ckpt} (step {done_steps})", flush=True)
    if is_rank_zero():
        save_recipe(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir)
    start = time.perf_counter()
    # our own checkpoint, its bytes verified against their checksum: a full (not weights-only) load is safe
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt, weights_only=False)
    # The final state too, so a rerun with a larger train.max_steps continues instead of repeating steps.
    final = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(final, weights_only=False)
    if cfg.train.wandb:  # close the wandb run: the next train in this process (a sweep point) gets its own
        import wandb

        wandb.finish()
    if trainer.is_global_zero:
        if cfg.train.strategy == "fsdp":  # its parameters are shards (DTensors): save a module holding them whole
            module = unsharded(method, cfg, micro, final)
        registry.resolve(method.save)(module, cfg, run_dir / "model")
        from dparallel.core.plots import training_curves

        # RUN_DIR/train.png: the loss (and every other logged metric) against the step
        training_curves(
            run_dir, title=f"{cfg.name} ({cfg.method}, {cfg.model.path}), batch {cfg.train.global_batch_size}"
        )
        print(
            f"trained {cfg.method} for {trainer.global_step} steps in {time.perf_counter() - start:.0f}s; "
            f"model saved to {run_dir / 'model'}",
            flush=True,
        )
        if cfg.eval.after_train:
            evaluate_into(cfg, run_dir, str(run_dir / "model"))
    return run_dir / "model"


def unsharded(method, cfg: DictConfig, micro: int, checkpoint: Path):
    """A fresh module of the recipe loaded with the full state that Lightning gathered into ``checkpoint``: what a
    trained fsdp module is, without the sharding that ``save_pretrained`` cannot write."""
    import torch

    module = registry.resolve(method.build)(cfg, micro, 0)[0]
    module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    return module
