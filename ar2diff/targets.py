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

import dataclasses
import sys
import time

from dparallel.data.config import RecordSuiteConfig, SourceConfig
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
    suites = [
        RecordSuiteConfig([task], split="train", n_per_task=section.parent_prompts, seed=seed) for task in section.tasks
    ]
    return [load_items(SourceConfig(kind="suite", suite=suite), dedup=False) for suite in suites]


def parent_targets(parent, section, seed: int) -> list[Item]:
    """Each pool prompt with the parent's greedy answer (canvas ``max(gen_lengths)``), or the data's answer where
    the checker (the suite's verifier; none for a custom source) rejects the parent's. ``parent``: the loaded AR
    adapter, before conversion."""
    from dparallel.engine.pipeline import Pipeline

    pipeline, groups, G = Pipeline(parent), pool_items(section, seed), max(section.gen_lengths)
    checker = build_checker("auto", section.source, [it for g in groups for it in g])
    start, items, kept = time.perf_counter(), [], 0
    for group in groups:
        gens = pipeline.generate(
            [it.prompt for it in group],
            chat_template=section.source.chat_template,
            batch_size=DECODE_BATCH,
            gen_length=G,
            block_length=G,
            temperature=0.0,
        )
        for item, gen in zip(group, gens):
            ok = checker is None or checker(item, gen.text)
            kept += ok
            items.append(dataclasses.replace(item, answer=gen.text) if ok else item)
    print(
        f"ar2diff targets=parent: {len(items):,} prompts answered by the parent in "
        f"{time.perf_counter() - start:.0f}s; {kept / len(items):.1%} kept (the rest keep the data's answer)",
        file=sys.stderr,
    )
    return items
