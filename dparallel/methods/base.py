"""The small shared base of every method: optimizer and schedule, LoRA through peft, logging, checkpoints and the
Lightning Trainer built from the recipe (strategy, precision, devices, accumulation from the global batch)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig

from dparallel.adapters.base import ModelAdapter
from dparallel.core.errors import DParallelError, require
from dparallel.methods.checkpoints import VerifiedCheckpointIO


class DParallelModule(L.LightningModule):
    """Base LightningModule. A method subclasses it and implements :meth:`compute_loss` (and, for RL, its own
    ``training_step``). ``self.adapter.model`` is the network being trained (or the frozen base of a head)."""

    def __init__(self, cfg: DictConfig, adapter: ModelAdapter):
        super().__init__()
        self.cfg, self.adapter = cfg, adapter
        self.model = adapter.model

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss and the named parts to log."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self.compute_loss(batch)
        # sync_dist: the logged value is the mean over ranks, i.e. the global batch's (what one process would log).
        n = self._batch_size(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=self._batch_size(batch))
        return loss

    def configure_model(self) -> None:
        """Under ``train.strategy=fsdp`` (Lightning's ``ModelParallelStrategy``, FSDP2): shard each transformer
        block (the classes the model names in ``_no_split_modules``), then the rest, over the data-parallel mesh.
        FSDP2 keeps parameter names, so checkpoints and exports read the same as under ddp."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft-wrapped
        blocks = set(getattr(base, "_no_split_modules", None) or [])
        for module in self.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])

    @staticmethod
    def _batch_size(batch: dict) -> int:
        return next(iter(batch.values())).shape[0]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        t = self.cfg.train
        params = self.trainable_parameters()
        require(len(params) > 0, "nothing to train: every parameter is frozen (check lora.* and the method)")
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_schedule(opt, t), "interval": "step"}}


def lr_schedule(opt: torch.optim.Optimizer, t: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedules: a linear warm-up from 0 over ``warmup_steps``, then constant, or a cosine decay to
    ``min_lr_ratio`` x lr at ``schedule_steps`` (default ``max_steps``; larger stops mid-decay)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    require(t.schedule in ("cosine", "constant"), f"train.schedule={t.schedule!r}: use cosine or constant")
    if t.schedule == "constant":
        return get_constant_schedule_with_warmup(opt, t.warmup_steps)
    total = t.schedule_steps or t.max_steps
    return get_cosine_with_min_lr_schedule_with_warmup(opt, t.warmup_steps, total, min_lr_rate=t.min_lr_ratio)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """[n] the order of epoch ``epoch`` over ``n`` training items: a permutation seeded by (seed, epoch), so every
    rank draws the same one and a resumed run recomputes it exactly; ``arange(n)`` when not shuffling."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def prepare_for_training(adapter: ModelAdapter, cfg: DictConfig) -> None:
    """Put a loaded model in training mode, with LoRA (``cfg.lora.enabled``) and gradient checkpointing
    (``cfg.train.gradient_checkpointing``) as the recipe asks."""
    if cfg.lora.enabled:
        apply_lora(adapter, cfg.lora)
    if cfg.train.gradient_checkpointing:
        adapter.model.gradient_checkpointing_enable()
    adapter.model.train()  # load_adapter hands back an eval-mode model; Lightning keeps whatever mode it finds


def apply_lora(adapter: ModelAdapter, cfg: DictConfig) -> None:
    """Wrap ``adapter.model`` in a peft LoRA model. A target list that matches no module is an error."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.targets or adapter.lora_targets)
    names = {n.rsplit(".", 1)[-1] for n, _ in adapter.model.named_modules()}
    missing = [t for t in targets if t not in names]
    require(
        not missing,
        f"lora.targets {missing} match no module of the {adapter.family} model "
        f"(its linear layers: {', '.join(sorted(_linear_names(adapter.model)))})",
    )
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapter.model = get_peft_model(adapter.model, lora)


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def world_size() -> tuple[int, int]:
    """(devices per node, nodes) from torchrun's environment, or (1, 1) for a plain process."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return local, max(1, int(os.environ.get("WORLD_SIZE", local)) // local)


def micro_batch(cfg: DictConfig) -> tuple[int, int]:
    """(per-device batch, accumulation) so that micro x accumulation x world == global batch."""
    local, nodes = world_size()
    world = local * nodes
    t = cfg.train
    total = t.schedule_steps or t.max_steps
    require(
        total >= t.max_steps,
        f"train.schedule_steps={total} ends before train.max_steps={t.max_steps}: the cosine would rise again; "
        "raise schedule_steps or leave it unset",
    )
    require(
        t.warmup_steps <= total,
        f"train.warmup_steps={t.warmup_steps} is longer than the schedule ({total} steps): shorten the warm-up",
    )
    micro = t.micro_batch_size or max(1, t.global_batch_size // world)
    require(
        t.global_batch_size % (micro * world) == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size={micro} x "
        f"world size {world}: change one of them",
    )
    return micro, t.global_batch_size // (micro * world)


def _wandb_login() -> bool:
    """Whether wandb has credentials: WANDB_API_KEY, or the entry `wandb login` writes to ~/.netrc."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(cfg: DictConfig, run_dir: Path):
    """Lightning's WandbLogger with the resolved recipe as the run's config, a name from the recipe and its run
    folder (a sweep point's folder names its parameters), the method as a tag and, under an agent, the sweep as
    the group. Without a login it logs offline, saying so in one line."""
    from lightning.pytorch.loggers import WandbLogger
    from omegaconf import OmegaConf

    if "WANDB_MODE" not in os.environ and not _wandb_login():
        os.environ["WANDB_MODE"] = "offline"
        print(f"wandb: no login found, logging offline to {run_dir / 'wandb'} (`wandb sync` uploads it later)")
    name = cfg.name if run_dir.name == cfg.name else f"{cfg.name}/{run_dir.name}"
    logger = WandbLogger(
        project=cfg.train.wandb_project,
        name=name,
        save_dir=str(run_dir),
        group=os.environ.get("WANDB_SWEEP_ID") or cfg.name,
        tags=[cfg.method],
    )
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole run in optimizer steps of ``train.max_steps`` (a resumed run starts at its step), with
    the logged metrics and no ``v_num``: the runs are step-based, Lightning's default bar counts epochs."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.update(trainer.global_step)
        self.train_progress_bar.set_description(f"train {trainer.lightning_module.cfg.method}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.update(trainer.global_step - bar.n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: L.Trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def bar_refresh_rate(max_steps: int) -> int:
    """Steps between progress-bar updates: every step on a terminal; about 20 lines in all when stderr is a file
    (a log of a 2,000-step run would otherwise hold 2,000 carriage-return updates)."""
    import sys

    return 1 if sys.stderr.isatty() else max(1, max_steps // 20)


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None) -> L.Trainer:
    """A Lightning Trainer from the recipe: checkpoints in RUN_DIR/checkpoints (``last.ckpt`` for resume),
    CSV logs in RUN_DIR/logs, wandb when asked."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    t = cfg.train
    cuda = torch.cuda.is_available() and cfg.model.device != "cpu"
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    local, nodes = world_size()
    _, accumulate = micro_batch(cfg)
    strategy = t.strategy
    if strategy == "auto" and local * nodes > 1:
        strategy = "ddp"
    if strategy.startswith("deepspeed"):  # DeepSpeed's optimizers and kernels are CUDA-only
        require(cuda, f"train.strategy={strategy} needs a GPU: use ddp or fsdp (or auto) on CPU")
    if strategy == "fsdp":
        strategy = fsdp_strategy(local * nodes)
    # One version folder per attempt (logs/version_N/metrics.csv): a resumed run keeps the earlier metrics.
    loggers = [CSVLogger(str(run_dir), name="logs")]
    if t.wandb:
        loggers.append(wandb_logger(cfg, run_dir))
    ckpt = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), save_last=True, every_n_train_steps=t.checkpoint_every, save_top_k=0
    )
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=local if local > 1 else (1 if t.devices == "auto" else t.devices),
        num_nodes=nodes,
        strategy=strategy,
        precision=precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t.grad_clip,
        log_every_n_steps=t.log_every,
        logger=loggers,
        callbacks=[ckpt, StepProgressBar(refresh_rate=bar_refresh_rate(t.max_steps)), *(extra_callbacks or [])],
        plugins=[VerifiedCheckpointIO()],
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
    )


def fsdp_strategy(world: int):
    """FSDP2 through Lightning's ``ModelParallelStrategy``: every rank one data-parallel shard (no tensor
    parallelism), full-state checkpoints written once by rank 0 through :class:`VerifiedCheckpointIO`, so a run
    resumes under ddp or fsdp alike. Unlike Lightning's ``FSDPStrategy`` (FSDP1, which refuses the CPU), it runs
    on gloo too, which is how ``make test`` exercises it."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False)


# Sections whose keys never change what a checkpoint holds: a resume may change them freely (more steps, another
# eval, another run folder). Every other key may shape the model or the method, and is compared on resume.
RESUMABLE_SECTIONS = ("name", "run_dir", "train", "eval", "decode", "bench", "sweep", "quickstart")


def changed_keys(old: DictConfig, new: DictConfig) -> list[str]:
    """Dotted recipe keys outside :data:`RESUMABLE_SECTIONS` whose values differ between two resolved recipes."""
    from omegaconf import OmegaConf

    def flat(node, prefix: str = "") -> dict[str, object]:
        if isinstance(node, dict):
            return {k: v for key, child in node.items() for k, v in flat(child, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    a, b = flat(OmegaConf.to_container(old)), flat(OmegaConf.to_container(new))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return [k for k in keys if k.split(".")[0] not in RESUMABLE_SECTIONS]


def check_resume(run_dir: Path, cfg: DictConfig, ckpt: str, module: torch.nn.Module | None = None) -> None:
    """Refuse, in one line, to resume RUN_DIR's checkpoint under a recipe that changes the method (checked before
    the module is built) or the shape of what is trained (checked against ``module``, once built). The run
    folder's config.yaml names the recipe the run was started with."""
    from omegaconf import OmegaConf

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = OmegaConf.load(saved)
    fix = f"use another run_dir, or delete {run_dir / 'checkpoints'} to start over"
    require(
        old.get("method") == cfg.method,
        f"{run_dir} holds a {old.get('method')!r} run; this recipe trains {cfg.method!r}: {fix}",
    )
    if module is None:
        return
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    current = module.state_dict()
    differ = sorted(k for k in current.keys() & state.keys() if current[k].shape != state[k].shape)
    differ += sorted(current.keys() ^ state.keys())
    if differ:
        keys = changed_keys(old, cfg)
        raise DParallelError(
            f"cannot resume {ckpt}: the recipe changed {', '.join(keys) or 'the model'} since the run started "
            f"({len(differ)} tensors differ, e.g. {differ[0]}): {fix}"
        )
