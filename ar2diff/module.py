"""``BlockDiffusionModule``: fine-tune a stock causal LM into a block-diffusion model, with every published
recipe's choices as switches (Fast-dLLM v2, BD3-LM, SDAR, NBDiff, Efficient-DLM; see docs/methods/ar2diff.md).

One training forward runs ``[x_t ⊕ x_0]`` (length 2L, positions shared) under ``ar2diff.masks.training_mask``:
x_t is the row with answer tokens replaced by the mask token, x_0 the clean row. Answer position p of x_t is
masked with probability p_i (below); the loss is the cross-entropy of the masked tokens.

- Noise level t ~ U(eps, 1) per block (``noise=block``: BD3-LM, Fast-dLLM v2) or per row (``noise=sample``: SDAR).
- Position-dependent masking (Efficient-DLM): p_i = clamp(t (1 + s (j / (B - 1) - 1/2)), eps, 1) for the j-th
  token of its block, ``position_slope`` s in [0, 2]: later tokens are masked more, the block mean stays t.
- ``inverse_t_weight``: CE / p_i summed and divided by the answer length (the ELBO weight of BD3-LM/SDAR), else
  the plain mean CE over masked tokens (Fast-dLLM v2).
- ``token_shift`` (Fast-dLLM v2, NBDiff): position p is predicted from the output at p - 1, as the AR parent did;
  for the first token of a block that output is the clean half's (the previous block is clean). Without it
  (SDAR, Efficient-DLM) position p predicts itself.
- ``complementary`` (Fast-dLLM v2): a second copy masks exactly the answer tokens the first left clean (with
  probability 1 - p_i), so every answer token is supervised once per pair.
- ``context_causal`` (NBDiff): the clean half attends token-causally; ``ar_loss_weight`` > 0 adds the AR
  next-token loss on it (and implies ``context_causal``, which the saved model then decodes with).
- ``curriculum`` (NBDiff): block size 1 (pure AR) growing by doubling to ``block_size`` over
  ``curriculum_steps`` (``grow``), or 1 then ``block_size`` at ``curriculum_steps`` (``jump``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dparallel.adapters.base import position_ids_from_mask
from dparallel.ar2diff.config import Ar2DiffConfig
from dparallel.ar2diff.masks import block_ids, training_mask
from dparallel.data.config import SourceConfig
from dparallel.methods.base import DParallelModule


def curriculum_block(cfg: Ar2DiffConfig, step: int) -> int:
    """The block size trained at ``step``."""
    if cfg.curriculum == "none" or step >= cfg.curriculum_steps:
        return cfg.block_size
    if cfg.curriculum == "jump":
        return 1
    stages = cfg.block_size.bit_length() - 1  # 1 -> 2 -> ... -> block_size: this many doublings
    return min(cfg.block_size, 2 ** (step * (stages + 1) // max(1, cfg.curriculum_steps)))


def mask_probabilities(
    cfg: Ar2DiffConfig, answer: torch.Tensor, blocks: torch.Tensor, block_size: int, generator=None
) -> torch.Tensor:
    """[B, L] mask probability of every position (0 outside the answer). answer: [B, L] bool; blocks: [L]."""
    B, L = answer.shape
    n_blocks = int(blocks[-1]) + 1
    if cfg.noise == "block":
        t = torch.rand(B, n_blocks, generator=generator, device=answer.device)[:, blocks]  # [B, L]
    else:
        t = torch.rand(B, 1, generator=generator, device=answer.device).expand(B, L)
    t = cfg.eps + (1 - cfg.eps) * t
    if cfg.position_slope > 0 and block_size > 1:
        j = (torch.arange(L, device=answer.device) + (-L) % block_size) % block_size  # index inside the block
        t = t * (1 + cfg.position_slope * (j / (block_size - 1) - 0.5))
    return t.clamp(cfg.eps, 1.0) * answer


def noisy_copies(x: torch.Tensor, answer: torch.Tensor, p: torch.Tensor, generator=None) -> list[tuple]:
    """[(masked [B, L], mask probability [B, L])]: one draw, plus its complement when asked by the caller."""
    masked = (torch.rand(x.shape, generator=generator, device=x.device) < p) & answer
    return [(masked, p), (answer & ~masked, (1 - p).clamp(min=1e-3) * answer)]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] position of each token inside its document (packed rows restart at 0 on every new document id)."""
    L = doc_ids.shape[1]
    index = torch.arange(L, device=doc_ids.device).expand_as(doc_ids)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(new_doc, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start


class BlockDiffusionModule(DParallelModule):
    """AR -> block diffusion. Batches: input_ids, attention_mask, prompt_mask (``data.sft.collate``), and for
    packed rows ``doc_ids`` [B, L] (no attention across documents, positions restart per document: SDAR)."""

    def __init__(self, cfg, adapter):
        super().__init__(cfg, adapter)
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(cfg.ar2diff)
        section["source"] = SourceConfig(**section["source"])
        self.recipe = Ar2DiffConfig(**section)
        self.recipe.validate()

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        r, mask_id = self.recipe, self.adapter.ids.mask
        x, attn, answer = batch["input_ids"], batch["attention_mask"], ~batch["prompt_mask"]
        B, L = x.shape
        size = curriculum_block(r, self.global_step)
        blocks = block_ids(L, size, x.device)
        copies = noisy_copies(x, answer, mask_probabilities(r, answer, blocks, size, generator), generator)
        copies = copies if r.complementary else copies[:1]
        C = len(copies)
        masked = torch.cat([m for m, _ in copies])  # [C*B, L]
        p = torch.cat([q for _, q in copies])
        clean = x.repeat(C, 1)
        inputs = torch.cat([clean.masked_fill(masked, mask_id), clean], dim=1)  # [C*B, 2L]: x_t ⊕ x_0
        valid = attn.repeat(C, 1)
        docs = batch["doc_ids"].repeat(C, 1) if "doc_ids" in batch else None  # packed rows: [B, L] document ids
        positions = position_ids_from_mask(valid) if docs is None else document_positions(docs)
        out = self.adapter.model(
            input_ids=inputs,
            attention_mask=training_mask(blocks, valid, docs, r.causal_context),
            position_ids=torch.cat([positions, positions], dim=1),
        ).logits  # [C*B, 2L, V]
        rows, cols = masked.nonzero(as_tuple=True)  # supervised x_t positions
        source = self._source_index(cols, blocks, L, r.token_shift)
        ce = F.cross_entropy(out[rows, source].float(), clean[rows, cols], reduction="none")  # [N]
        if r.inverse_t_weight:
            loss = (ce / p[rows, cols]).sum() / (C * answer.sum()).clamp(min=1)
        else:
            loss = ce.sum() / max(1, ce.numel())
        parts = {"diffusion_loss": loss.detach(), "block_size": float(size)}
        if r.ar_loss_weight > 0:
            ar = self._ar_loss(out[:B, L:], x, answer)
            loss = loss + r.ar_loss_weight * ar
            parts["ar_loss"] = ar.detach()
        with torch.no_grad():
            parts["masked_acc"] = (out[rows, source].argmax(-1) == clean[rows, cols]).float().mean()
        return loss, parts

    @staticmethod
    def _source_index(cols: torch.Tensor, blocks: torch.Tensor, L: int, token_shift: bool) -> torch.Tensor:
        """Index into the 2L logits of the output that predicts x_t position ``cols``: itself without token shift;
        with it, p - 1 on the noisy half, or on the clean half (index L + p - 1) for a block's first token."""
        if not token_shift:
            return cols
        first = torch.ones_like(blocks, dtype=torch.bool)
        first[1:] = blocks[1:] != blocks[:-1]
        return cols - 1 + L * first[cols].long()

    @staticmethod
    def _ar_loss(clean_logits: torch.Tensor, x: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        """Next-token CE of the (token-causal) clean half over answer positions: logits[p - 1] predicts x[p]."""
        pred = clean_logits[:, :-1][answer[:, 1:]]
        return F.cross_entropy(pred.float(), x[:, 1:][answer[:, 1:]])
