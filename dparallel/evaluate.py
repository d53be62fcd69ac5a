"""Evaluation on the synthetic suite: accuracy, NFE, TPF, tokens/s and wall time per (decoder, task), written as
``eval.json``, ``eval.md`` and ``pareto.png`` (accuracy against NFE, one point per decoder)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dparallel.data.suite import is_correct, make_split
from dparallel.generator import Generation, Generator
from dparallel.io import atomic_write_json, atomic_write_text

METRICS = ("accuracy", "nfe", "tpf", "tokens_per_s", "wall_s")


def _row(decoder: str, task: str, gens: list[Generation], correct: list[bool], wall: float) -> dict:
    n = len(gens)
    nfe = sum(g.stats.nfe for g in gens) / n
    answer_tokens = sum(g.stats.answer_tokens for g in gens)
    return {
        "decoder": decoder,
        "task": task,
        "n": n,
        "accuracy": sum(correct) / n,
        "nfe": nfe,
        "tpf": answer_tokens / max(1, sum(g.stats.nfe for g in gens)),
        "tokens_per_s": answer_tokens / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "sampler_calls": sum(g.stats.sampler_calls for g in gens) / n,  # learned-layer calls beside the forwards
    }


def evaluate(generator: Generator, eval_cfg: DictConfig, progress: bool = True) -> list[dict]:
    """Decode the suite split with every decoder; one row per (decoder, task) plus a ``macro`` row per decoder."""
    suite = eval_cfg.suite
    examples = make_split(list(suite.tasks), suite.split, suite.n_per_task, suite.seed)
    prompts = [e.prompt for e in examples]
    ids = generator.adapter.encode(prompts)
    rows, outputs = [], {}
    for spec in eval_cfg.decoders:
        spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec)
        name, reference = spec.pop("name"), spec.pop("reference", None)
        start = time.perf_counter()
        replay = _oracle(outputs, reference) if spec.get("rule") == "oracle" else None
        gens = generator.generate_ids(prompts, ids, batch_size=eval_cfg.batch_size, rule_for_batch=replay, **spec)
        wall = time.perf_counter() - start
        outputs[name] = gens
        per_task = []
        for task in suite.tasks:
            picked = [(g, e) for g, e in zip(gens, examples) if e.task == task]
            g_task = [g for g, _ in picked]
            correct = [is_correct(task, e.prompt, g.text) for g, e in picked]
            share = wall * len(g_task) / len(gens)  # the batch's wall time split by rows
            per_task.append(_row(name, task, g_task, correct, share))
        rows += per_task
        macro = {"decoder": name, "task": "macro", "n": sum(r["n"] for r in per_task)}
        macro.update({m: sum(r[m] for r in per_task) / len(per_task) for m in METRICS})
        macro["tokens_per_s"] = sum(g.stats.answer_tokens for g in gens) / wall
        macro["wall_s"] = wall
        macro["sampler_calls"] = sum(g.stats.sampler_calls for g in gens) / len(gens)
        rows.append(macro)
        if progress:
            print(
                f"  {name:<14} accuracy {macro['accuracy']:.3f}  NFE {macro['nfe']:.1f}  TPF {macro['tpf']:.2f}"
                f"  {macro['tokens_per_s']:.0f} tok/s  ({wall:.0f}s)",
                flush=True,
            )
    return rows


def _oracle(outputs: dict[str, list[Generation]], reference: str | None):
    """Learn2PD's oracle replay of an earlier decoder's outputs in this eval: its NFE is the ceiling a filter
    trained on that decoder's trajectories can reach."""
    from dparallel.errors import require
    from dparallel.filters.learn2pd import OracleRule

    require(
        reference in outputs,
        f"the oracle decoder replays an earlier decoder: set reference to one of {sorted(outputs) or '(none yet)'}",
    )
    tokens = torch.tensor([g.tokens for g in outputs[reference]])  # [N, G]
    return lambda start, end: OracleRule(tokens[start:end])


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_report(run_dir: Path, model: str, suite: str, rows: list[dict], plot: bool = True) -> dict:
    """Write eval.json, eval.md and (optionally) pareto.png into ``run_dir``; return the eval.json object."""
    report = {"model": model, "suite": suite, "device": device_name(), "results": rows}
    atomic_write_json(run_dir / "eval.json", report)
    atomic_write_text(run_dir / "eval.md", markdown_table(rows))
    if plot:
        pareto_plot(rows, run_dir / "pareto.png")
    return report


def markdown_table(rows: list[dict]) -> str:
    head = "| decoder | task | n | accuracy | NFE | TPF | tokens/s | wall s |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['decoder']} | {r['task']} | {r['n']} | {r['accuracy']:.3f} | {r['nfe']:.1f} | {r['tpf']:.2f} "
        f"| {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} |\n"
        for r in rows
    )
    return head + body


def pareto_plot(rows: list[dict], out: Path) -> None:
    """Macro accuracy against mean NFE, one labelled point per decoder."""
    from dparallel.plots import new_figure, save_figure

    macro = [r for r in rows if r["task"] == "macro"]
    fig, axes = new_figure(5, 3.5)
    ax = axes[0, 0]
    for r in macro:
        ax.scatter(r["nfe"], r["accuracy"])
        ax.annotate(r["decoder"], (r["nfe"], r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("NFE (full-model forwards per answer)")
    ax.set_ylabel("macro accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    save_figure(fig, out)
