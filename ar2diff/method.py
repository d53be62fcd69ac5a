"""The ``ar`` and ``ar2diff`` training methods: build (module + data) and save, registered in dparallel.methods.

- ``ar``: supervised fine-tuning of a stock causal LM on (prompt, answer) rows (next-token CE over the answer up
  to and including its EOS). On the embedded default it starts from the tiny teacher's weights (a stock
  ``LlamaForCausalLM`` trained bidirectionally) and learns to read them causally: the AR parent of the tiny twin.
- ``ar2diff``: converts a saved AR folder into a ``block`` model with :class:`BlockDiffusionModule`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from dparallel.core.errors import require
from dparallel.core.runtime import weights_dtype
from dparallel.data.config import SourceConfig
from dparallel.data.sft import SuiteBatches, collate, pad_answer
from dparallel.methods.base import DParallelModule, prepare_for_training


class ItemBatches(IterableDataset):
    """Endless SFT batches from a list of (prompt, answer) items (a custom source, or the parent's answers): rows
    drawn by a seeded RNG per batch index, answers cut to ``gen_length - 1`` tokens and EOS-padded; the same
    layout as ``SuiteBatches``."""

    def __init__(self, adapter, items, chat: bool, batch_size: int, gen_lengths: list[int], seed, rank, world, start):
        self.items = [it for it in items if it.answer is not None]
        require(len(self.items) > 0, "the training source has no answer column: set source.answer_column")
        self.adapter, self.chat = adapter, chat
        self.batch_size, self.gen_lengths, self.seed = batch_size, list(gen_lengths), seed
        self.rank, self.world, self.start = rank, world, start

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}|{i}|{self.rank}")
        G = rng.choice(self.gen_lengths)
        items = [rng.choice(self.items) for _ in range(self.batch_size)]
        ids = self.adapter.ids
        prompts = self.adapter.encode([it.prompt for it in items], self.chat)
        answers = self.adapter.tokenizer([it.answer for it in items], add_special_tokens=False).input_ids
        return collate(prompts, [pad_answer(a[: G - 1], G, ids.eos) for a in answers], ids.pad)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        i = self.start
        while True:
            yield self.batch(i)
            i += 1


def train_loader(
    cfg: DictConfig, section: DictConfig, adapter, micro: int, start_batch: int, items: list | None = None
) -> DataLoader:
    """The synthetic suite (``source.kind=suite``), a custom (prompt, answer) source, or ``items`` (the parent's
    answers, ar2diff.targets=parent), rank-sharded."""
    from dparallel.core.runtime import rank_world
    from dparallel.data.sources import load_items

    rank, world = rank_world()
    ids = adapter.ids
    if items is None and section.source.kind == "suite":
        stream = SuiteBatches(
            adapter.tokenizer, list(section.tasks), micro, list(section.gen_lengths), ids.eos, ids.pad,
            seed=cfg.train.seed, rank=rank, world=world, start_batch=start_batch,
        )  # fmt: skip
    else:
        if items is None:
            items = load_items(SourceConfig(**OmegaConf.to_container(section.source)))
        chat = section.source.chat_template
        stream = ItemBatches(
            adapter, items, chat, micro, list(section.gen_lengths), cfg.train.seed, rank, world, start_batch
        )
    return DataLoader(stream, batch_size=None, num_workers=cfg.train.num_workers)


# ---- ar -------------------------------------------------------------------------------------------------------
class ARModule(DParallelModule):
    """Next-token SFT: CE of answer tokens up to and including the first EOS (the EOS tail is not trained)."""

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x, attn, answer = batch["input_ids"], batch["attention_mask"], ~batch["prompt_mask"]
        eos = (x == self.adapter.ids.eos) & answer
        before_first_eos = (eos.long().cumsum(1) - eos.long()) == 0
        target = answer & before_first_eos  # [B, L]
        logits = self.adapter.logits(x, attn)  # aligned: logits[:, p] predicts x[:, p]
        loss = F.cross_entropy(logits[target].float(), x[target])
        with torch.no_grad():
            acc = (logits[target].argmax(-1) == x[target]).float().mean()
        return loss, {"token_acc": acc}


def build_ar(cfg: DictConfig, micro: int, start_batch: int):
    from dparallel.adapters.load import load_adapter
    from dparallel.ar2diff.family import ARAdapter

    if cfg.ar.init == "scratch":
        from dparallel.adapters.tiny import new_tiny_adapter

        tiny = new_tiny_adapter(cfg.tiny, seed=cfg.train.seed)
        adapter = ARAdapter(tiny.model, tiny.tokenizer, ARAdapter.default_ids(tiny.tokenizer), name="tiny-ar")
    else:
        require(cfg.ar.init == "pretrained", f"ar.init={cfg.ar.init!r}: use pretrained or scratch")
        adapter = load_adapter(
            cfg.model.path,
            family="ar",
            dtype=weights_dtype(cfg.model.dtype, cfg.model.device, frozen=cfg.lora.enabled),
            revision=cfg.model.revision,
        )
    adapter.model.train()
    prepare_for_training(adapter, cfg)
    return ARModule(cfg, adapter), train_loader(cfg, cfg.ar, adapter, micro, start_batch)


def save_ar(module: DParallelModule, cfg: DictConfig, out: Path) -> None:
    from dparallel.adapters.folder import save_model_folder

    save_model_folder(module.adapter, out, dtype=cfg.ar.save_dtype, recipe=cfg)


# ---- ar2diff --------------------------------------------------------------------------------------------------
def convert(adapter, block_size: int, context_causal: bool, token_shift: bool):
    """A loaded AR adapter -> a ``BlockAdapter`` over the same stock model: a mask token is added to a tokenizer
    without one (the embedding grows only when the vocabulary has no spare row) and the block settings are
    written into the model config (saved in config.json)."""
    from dparallel.adapters.base import SpecialIds
    from dparallel.ar2diff.family import MASK_TOKEN, BlockAdapter

    tok, model = adapter.tokenizer, adapter.model
    if tok.mask_token_id is None:
        tok.add_special_tokens({"mask_token": MASK_TOKEN})
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok))
    model.config.dparallel_block = {
        "block_size": block_size,
        "context_causal": context_causal,
        "token_shift": token_shift,
    }
    ids = SpecialIds(**{**adapter.ids.__dict__, "mask": tok.mask_token_id})
    return BlockAdapter(model, tok, ids, name=adapter.name, revision=adapter.revision)


def build_ar2diff(cfg: DictConfig, micro: int, start_batch: int):
    from dparallel.adapters.load import load_adapter
    from dparallel.ar2diff.module import BlockDiffusionModule

    s = cfg.ar2diff
    family = cfg.model.family or "ar"
    parent = load_adapter(
        cfg.model.path,
        family=family,
        dtype=weights_dtype(cfg.model.dtype, cfg.model.device, frozen=cfg.lora.enabled),
        revision=cfg.model.revision,
    )
    items = None
    if s.targets == "parent":  # decoded before conversion: the parent's own answers (ar2diff/targets.py)
        from dparallel.ar2diff.targets import parent_targets

        items = parent_targets(parent, s, cfg.train.seed)
    adapter = convert(parent, s.block_size, s.context_causal or s.ar_loss_weight > 0, s.token_shift)
    adapter.model.train()
    prepare_for_training(adapter, cfg)
    return BlockDiffusionModule(cfg, adapter), train_loader(cfg, s, adapter, micro, start_batch, items)


def save_ar2diff(module: DParallelModule, cfg: DictConfig, out: Path) -> None:
    from dparallel.adapters.folder import save_model_folder

    save_model_folder(module.adapter, out, dtype=cfg.ar2diff.save_dtype, recipe=cfg)
