"""The conversion's bar, measured in one run: the AR parent (greedy, transformers' KV cache) against the converted
block model (block decoding with the exact block cache) on the same suite split, batch size and machine.

    python -m dparallel.ar2diff.compare --ar runs/ar/model --block runs/ar2diff/model --n 20 --out runs/compare

Writes OUT/compare.json and OUT/compare.md: per decoder the macro accuracy, its ratio to the AR parent's (bar
>= 0.95), NFE, TPF (bar >= 2.5), and the wall-clock per answer (bar: below the AR parent's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from dparallel.core.io import atomic_write_json, atomic_write_text
from dparallel.data.suite import GEN_LENGTH, TASKS


def block_decoders(block_size: int, gen_length: int, thresholds: list[float], sub_block: int | None) -> list[dict]:
    """Confidence-threshold decoders with the block cache (and sub-block decoding when asked), EoT stop on."""
    common = dict(rule="confidence", gen_length=gen_length, cache="block", eot_stop="accepted")
    specs = [dict(name=f"block-{t}", threshold=t, block_length=block_size, **common) for t in thresholds]
    if sub_block:
        specs += [dict(name=f"sub{sub_block}-{t}", threshold=t, block_length=sub_block, **common) for t in thresholds]
    return specs


def compare(
    ar: str,
    block: str,
    n: int,
    gen_length: int,
    thresholds: list[float],
    sub_block: int | None,
    tasks: list[str],
    batch_size: int = 120,
) -> list[dict]:
    """Macro rows of both models (the AR parent's first), with ``accuracy_ratio`` and ``wall_per_answer_s``."""
    from dparallel.commands.evaluate import evaluate
    from dparallel.engine.pipeline import load

    suite = {"tasks": tasks, "split": "test", "n_per_task": n, "seed": 0}
    parent = load(ar, family="ar", device="cpu")
    converted = load(block, device="cpu")
    runs = [
        (parent, [dict(name="ar-greedy", gen_length=gen_length, block_length=gen_length)]),
        (converted, block_decoders(converted.adapter.block_size, gen_length, thresholds, sub_block)),
    ]
    rows = []
    for gen, decoders in runs:
        cfg = OmegaConf.create({"suite": suite, "decoders": decoders, "batch_size": batch_size})
        rows += [r for r in evaluate(gen, cfg) if r["task"] == "macro"]
    base = rows[0]
    for r in rows:
        r["accuracy_ratio"] = r["accuracy"] / base["accuracy"] if base["accuracy"] > 0 else float("nan")
        r["wall_per_answer_s"] = r["wall_s"] / r["n"]
    return rows


def table(rows: list[dict]) -> str:
    head = "| decoder | n | accuracy | ratio to AR | NFE | TPF | wall s / answer | tokens/s |\n" + "|---" * 8 + "|\n"
    return head + "".join(
        f"| {r['decoder']} | {r['n']} | {r['accuracy']:.3f} | {r['accuracy_ratio']:.3f} | {r['nfe']:.1f} "
        f"| {r['tpf']:.2f} | {r['wall_per_answer_s']:.4f} | {r['tokens_per_s']:.1f} |\n"
        for r in rows
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dparallel.ar2diff.compare", description=__doc__.split("\n")[0])
    p.add_argument("--ar", required=True, help="the AR parent folder (family ar)")
    p.add_argument("--block", required=True, help="the converted folder (family block)")
    p.add_argument("--n", type=int, default=20, help="test examples per task")
    p.add_argument("--gen-length", type=int, default=GEN_LENGTH)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9])
    p.add_argument("--sub-block", type=int, default=None, help="also decode in sub-blocks of this size")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--batch-size", type=int, default=120, help="prompts per decoding batch (1: latency)")
    p.add_argument("--out", default="runs/compare")
    a = p.parse_args(argv)
    rows = compare(a.ar, a.block, a.n, a.gen_length, a.thresholds, a.sub_block, a.tasks, a.batch_size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", {"ar": a.ar, "block": a.block, "rows": rows})
    atomic_write_text(out / "compare.md", table(rows))
    print(table(rows) + f"report: {out / 'compare.md'}", flush=True)


if __name__ == "__main__":
    main()
