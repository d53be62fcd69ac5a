"""Supervised (prompt, answer) batches for masked-diffusion training.

Layout of a row, the same as at decoding time: ``[pad ... pad, prompt ..., answer ..., EOS ... EOS]`` where the
prompt is left-padded to the batch's widest prompt and the answer canvas is exactly ``gen_length`` tokens, the
answer followed by EOS up to the end (LLaDA's SFT recipe: the model learns to fill the tail with EOS).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dparallel.core.errors import require
from dparallel.data.suite import make_example, validate_tasks


def pad_answer(ids: list[int], gen_length: int, eos_id: int) -> list[int]:
    """Answer ids followed by EOS up to ``gen_length``; too long an answer is an error."""
    require(len(ids) < gen_length, f"answer of {len(ids)} tokens does not fit gen_length={gen_length}")
    return ids + [eos_id] * (gen_length - len(ids))


def collate(prompts: list[list[int]], canvases: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts and stack. Returns input_ids, attention_mask and prompt_mask (True on prompt and pad),
    each [B, P + G]."""
    width = max(len(p) for p in prompts)
    rows, attn, prompt_mask = [], [], []
    for p, c in zip(prompts, canvases):
        pad = width - len(p)
        rows.append([pad_id] * pad + p + c)
        attn.append([0] * pad + [1] * (len(p) + len(c)))
        prompt_mask.append([True] * width + [False] * len(c))
    return {
        "input_ids": torch.tensor(rows, dtype=torch.long),
        "attention_mask": torch.tensor(attn, dtype=torch.long),
        "prompt_mask": torch.tensor(prompt_mask, dtype=torch.bool),
    }


class SuiteBatches(IterableDataset):
    """An endless, reproducible stream of SFT batches from the synthetic suite's train split.

    Batch ``i`` on rank ``r`` of ``w`` draws examples ``(i * w + r) * batch_size + j`` (task chosen by a seeded
    RNG), so ranks see disjoint data and a resumed run can skip ahead by batch index.
    """

    def __init__(
        self,
        tokenizer,
        tasks: list[str],
        batch_size: int,
        gen_lengths: list[int],
        eos_id: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start_batch: int = 0,
    ):
        validate_tasks(tasks)
        self.tokenizer, self.tasks, self.batch_size = tokenizer, list(tasks), batch_size
        self.gen_lengths, self.eos_id, self.pad_id = list(gen_lengths), eos_id, pad_id
        self.seed, self.rank, self.world, self.start_batch = seed, rank, world, start_batch

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}|{i}|{self.rank}")
        gen_length = rng.choice(self.gen_lengths)
        base = (i * self.world + self.rank) * self.batch_size
        examples = [make_example(rng.choice(self.tasks), "train", base + j, self.seed) for j in range(self.batch_size)]
        prompts = self.tokenizer([e.prompt for e in examples]).input_ids
        answers = self.tokenizer([e.answer for e in examples], add_special_tokens=False).input_ids
        return collate(prompts, [pad_answer(a, gen_length, self.eos_id) for a in answers], self.pad_id)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # DataLoader workers take batches round-robin (worker w makes batches w, w + n, ...) and the loader
        # yields them in that same order, so the stream is identical for any number of workers.
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start_batch + worker
        while True:
            yield self.batch(i)
            i += workers
