"""Sequence-level distillation targets for a conversion (``ar2diff.targets=parent``).

Where the data allows many answers (a shuffle, a free insertion point, any k distinct letters), each training row
shows the model another one, so the converted model learns marginals spread over the answers at every position of
a block, and ``ltr`` decodes those positions one per forward (on the tiny suite the many-answers tasks took ~20
forwards for ~21 tokens at ``ltr`` 0.99). Training on the parent's own greedy answer to each prompt instead
(sequence-level knowledge distillation, Kim & Rush 2016: the standard fix for the multimodality of
non-autoregressive translation, Gu et al. 2018) leaves one answer per prompt, one the converted model, initialised
from the parent, already half knows. An answer the source's checker rejects keeps the data's answer.

The pool is decoded once, before training, on every rank (the parent is deterministic, so all ranks hold the same
pool): minutes for a small parent. For a large one, decode the answers beforehand (``dparallel generate --json``
with the parent) into a jsonl and train on it as ``ar2diff.source``.
"""

from __future__ import annotations

import sys
import time

from dparallel.core.errors import require
from dparallel.data.sources import Item, build_checker, load_items, resolve_kind

DECODE_BATCH = 64  # prompts per parent decoding call


def pool_items(section, seed: int) -> list[list[Item]]:
    """The prompts the parent answers, in groups decoded on their own: ``parent_prompts`` train prompts per suite
    task (one group each, so a batch never mixes tasks), or the custom source's prompts (one group).

    A suite pool keeps repeated prompts: rows are drawn uniformly from the pool, so each task keeps its share of
    them only if its group keeps its size (``distinct`` has one prompt per count; deduplicated it fell to ~20 of
    ~27,000 rows, was barely trained, and dropped from 0.72 to 0.43)."""
    if resolve_kind(section.source) != "suite":
        return [load_items(section.source)]
    from dparallel.data.suite import make_split

    groups = []
    for task in section.tasks:
        examples = make_split([task], "train", section.parent_prompts, seed)
        groups.append([Item(f"{e.task}/train/{e.index}", e.prompt, e.answer, e.task) for e in examples])
    return groups


def parent_targets(parent, section, seed: int) -> list[Item]:
    """Each pool prompt with the parent's greedy answer (canvas ``max(gen_lengths)``), or the data's answer where
    the checker (the suite's verifier; none for a custom source) rejects the parent's. ``parent``: the loaded AR
    adapter, before conversion."""
    from dparallel.engine.pipeline import Pipeline

    pipeline = Pipeline(parent)
    groups = pool_items(section, seed)
    checker = build_checker("auto", section.source, [it for g in groups for it in g])
    start, items, kept = time.perf_counter(), [], 0
    for group in groups:
        prompts = [it.prompt for it in group]
        gens = pipeline.generate_ids(
            prompts,
            parent.encode(prompts, section.source.chat_template),
            batch_size=DECODE_BATCH,
            gen_length=max(section.gen_lengths),
            block_length=max(section.gen_lengths),
            temperature=0.0,
        )
        for item, gen in zip(group, gens):
            ok = checker is None or checker(item, gen.text)
            kept += ok
            items.append(Item(item.id, item.prompt, gen.text if ok else item.answer, item.task))
    items = [it for it in items if it.answer is not None]
    require(len(items) > 0, "ar2diff.targets=parent: the parent answered no prompt the checker accepts")
    print(
        f"ar2diff targets=parent: {len(items):,} prompts answered by the parent in "
        f"{time.perf_counter() - start:.0f}s; {kept / max(len(items), 1):.1%} kept (the rest keep the data's answer)",
        file=sys.stderr,
    )
    return items
