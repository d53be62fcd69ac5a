"""Masked-diffusion pretraining / SFT (the MDLM objective, as LLaDA trains): trains the tiny teacher and
fine-tunes any family on (prompt, answer) data.

Per row a mask ratio t ~ U(0, 1) (stratified over the batch to cut variance), p = (1 - eps) t + eps; each answer
token is masked with probability p, the prompt never. The loss is the cross-entropy on masked tokens weighted by
1 / p and normalised by the answer length: a Monte-Carlo estimate of the negative ELBO.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from dparallel.core.runtime import rank_world
from dparallel.methods.base import DParallelModule, prepare_for_training


def mask_ratios(batch: int, eps: float, stratified: bool, generator: torch.Generator | None, device) -> torch.Tensor:
    """[B] mask probabilities p = (1 - eps) t + eps with t ~ U(0, 1), stratified: t_i = (u + i / B) mod 1."""
    u = torch.rand(batch if not stratified else 1, generator=generator, device=device)
    t = (u + torch.arange(batch, device=device) / batch) % 1 if stratified else u
    return (1 - eps) * t + eps


def mdlm_loss(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor, answer_len: torch.Tensor
) -> torch.Tensor:
    """logits: [B, L, V]; targets, masked: [B, L]; p_mask, answer_len: [B].
    Returns sum over masked tokens of CE / p / answer_len, averaged over rows (LLaDA's SFT normalisation)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]
    weight = masked.float() / (p_mask * answer_len)[:, None]
    return (ce * weight).sum() / targets.shape[0]


class MaskedDiffusionModule(DParallelModule):
    """MDLM pretraining/SFT. Batches: input_ids, attention_mask, prompt_mask (see ``data.sft.collate``)."""

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x, attn, prompt = batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]
        p = mask_ratios(x.shape[0], self.cfg.pretrain.eps, self.cfg.pretrain.stratified, None, x.device)
        masked = (torch.rand(x.shape, device=x.device) < p[:, None]) & ~prompt
        noisy = x.masked_fill(masked, self.adapter.ids.mask)
        logits = self.adapter.logits(noisy, attn)
        answer_len = (~prompt).sum(1).float()
        loss = mdlm_loss(logits, x, masked, p, answer_len)
        with torch.no_grad():
            acc = (logits.argmax(-1) == x)[masked].float().mean()
        return loss, {"masked_acc": acc.detach(), "mask_frac": masked.float().sum() / (~prompt).sum()}


def build(cfg: DictConfig, micro: int, start_batch: int):
    from torch.utils.data import DataLoader

    from dparallel.adapters.load import load_adapter
    from dparallel.adapters.tiny import new_tiny_adapter
    from dparallel.data.sft import SuiteBatches

    if cfg.pretrain.init == "scratch":
        adapter = new_tiny_adapter(cfg.tiny, seed=cfg.train.seed)
    else:
        adapter = load_adapter(cfg.model.path, family=cfg.model.family, revision=cfg.model.revision)
    prepare_for_training(adapter, cfg)
    rank, world = rank_world()
    ids = adapter.ids
    stream = SuiteBatches(
        adapter.tokenizer,
        list(cfg.pretrain.tasks),
        micro,
        list(cfg.pretrain.gen_lengths),
        ids.eos,
        ids.pad,
        seed=cfg.train.seed,
        rank=rank,
        world=world,
        start_batch=start_batch,
    )
    return MaskedDiffusionModule(cfg, adapter), DataLoader(stream, batch_size=None, num_workers=cfg.train.num_workers)


def save(module: DParallelModule, cfg: DictConfig, out: Path) -> None:
    from dparallel.adapters.folder import save_model_folder

    # The recipe's canvas becomes the model's default, so generate() without options fits the answers it learned.
    decoding = {"gen_length": cfg.decode.gen_length, "block_length": cfg.decode.block_length}
    save_model_folder(module.adapter, out, dtype=cfg.pretrain.save_dtype, recipe=cfg, decoding=decoding)
