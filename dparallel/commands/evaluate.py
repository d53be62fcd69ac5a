"""Evaluation on the synthetic suite: accuracy, NFE, TPF, tokens/s and wall time per (decoder, task), written as
``eval.json``, ``eval.md`` and ``pareto.png`` (accuracy against NFE, one point per decoder)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from dparallel.commands.config import decode_options
from dparallel.commands.frontier import decoder_kind, frontier_table, wilson_interval
from dparallel.commands.recipe import open_run_dir
from dparallel.core.errors import require
from dparallel.core.io import atomic_write_json, atomic_write_text, save_recipe
from dparallel.core.runtime import weights_dtype
from dparallel.data.suite import TASK_FAMILY, is_correct, make_split
from dparallel.engine.config import DecodeConfig
from dparallel.engine.pipeline import Generation, Pipeline, load

METRICS = ("accuracy", "nfe", "tpf", "tokens_per_s", "wall_s", "fill")


def _row(decoder: str, task: str, gens: list[Generation], correct: list[bool], wall: float, fill: float) -> dict:
    n = len(gens)
    answer_tokens = sum(g.stats.answer_tokens for g in gens)
    return {
        "decoder": decoder,
        "task": task,
        "family": TASK_FAMILY[task],
        "n": n,
        "accuracy": sum(correct) / n,
        "ci95": wilson_interval(sum(correct), n),
        "nfe": sum(g.stats.nfe for g in gens) / n,
        "tpf": answer_tokens / max(1, sum(g.stats.nfe for g in gens)),
        "tokens_per_s": answer_tokens / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "fill": fill,
        "sampler_calls": sum(g.stats.sampler_calls for g in gens) / n,  # learned-layer calls beside the forwards
    }


def _mean_row(decoder: str, task: str, family: str, rows: list[dict], gens: list[Generation], wall: float) -> dict:
    """A macro row over ``rows`` (one per task): accuracy, NFE and fill are means over tasks (each task weighs the
    same); tokens/s and sampler calls are over the decoded ``gens`` in ``wall`` seconds."""
    row = {"decoder": decoder, "task": task, "family": family, "n": sum(r["n"] for r in rows)}
    row.update({m: sum(r[m] for r in rows) / len(rows) for m in METRICS})
    correct = sum(round(r["accuracy"] * r["n"]) for r in rows)
    row["ci95"] = wilson_interval(correct, row["n"])
    row["tokens_per_s"] = sum(g.stats.answer_tokens for g in gens) / wall if wall > 0 else 0.0
    row["wall_s"] = wall
    row["sampler_calls"] = sum(g.stats.sampler_calls for g in gens) / max(1, len(gens))
    return row


def evaluate(
    generator: Pipeline,
    eval_cfg: DictConfig,
    progress: bool = True,
    load_model: Callable[[str], Pipeline] | None = None,
) -> list[dict]:
    """Decode the suite split with every decoder. Rows: one per (decoder, task), one per (decoder, task family)
    with ``task`` = the family's name, and one ``macro`` row per decoder.

    A decoder spec with ``model`` decodes with that model instead (a student, a component folder), loaded once by
    ``load_model``: the teacher's heuristics and a method's points then share one run and the same prompts. One
    with ``component`` attaches that component folder to its model (:meth:`Pipeline.with_component`)."""
    suite = eval_cfg.suite
    examples = make_split(list(suite.tasks), suite.split, suite.n_per_task, suite.seed)
    prompts = [e.prompt for e in examples]
    answers = generator.adapter.tokenizer([e.answer for e in examples], add_special_tokens=False).input_ids
    answer_len = [len(a) for a in answers]
    generators: dict[tuple[str | None, str | None], Pipeline] = {(None, None): generator}
    ids: dict[str | None, list[list[int]]] = {}
    rows, outputs, warned = [], {}, set()
    tasks = list(dict.fromkeys(e.task for e in examples))
    # one step per (decoder, task) on a terminal's stderr (none when piped); the summary lines go through it
    bar = tqdm(total=len(eval_cfg.decoders) * len(tasks), desc="eval", disable=None if progress else True, leave=False)
    for spec in eval_cfg.decoders:
        spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec)
        name, reference, model = spec["name"], spec.get("reference"), spec.get("model")
        gen_model = _pipeline(generators, model, spec.get("component"), load_model, name)
        spec = decode_options(spec)
        ids.setdefault(model, gen_model.adapter.encode(prompts))
        bar.set_postfix_str(name)
        gens, walls = _decode_by_task(
            gen_model, examples, prompts, ids[model], spec, eval_cfg.batch_size, outputs, reference, bar
        )
        wall = sum(walls.values())
        outputs[name] = gens
        gen_length = gen_model.decode_config(**spec).gen_length
        if gen_length not in warned:  # once per canvas, not once per decoder
            warn_truncated(examples, answer_len, gen_length)
            warned.add(gen_length)
        rows += _decoder_rows(name, examples, gens, answer_len, gen_length, walls)
        if progress:
            macro = rows[-1]
            bar.write(
                f"  {name:<16} accuracy {macro['accuracy']:.3f}  NFE {macro['nfe']:.1f}  TPF {macro['tpf']:.2f}"
                f"  {macro['tokens_per_s']:.0f} tok/s  ({wall:.0f}s)",
                file=sys.stdout,
            )
    bar.close()
    return rows


def _pipeline(generators: dict, model: str | None, component: str | None, load_model, name: str) -> Pipeline:
    """The pipeline a decoder decodes with: its ``model`` (None: the eval's; loaded once), with its ``component``
    attached (one pipeline per pair: attaching never changes the model's own pipeline)."""
    if (model, None) not in generators:
        require(load_model is not None, f"decoder {name} names model={model!r}: evaluate it through `eval`")
        generators[(model, None)] = load_model(model)
    if (model, component) not in generators:
        generators[(model, component)] = generators[(model, None)].with_component(component)
    return generators[(model, component)]


def _decode_by_task(gen_model, examples, prompts, ids, spec, batch_size, outputs, reference, bar):
    """Decode each task's prompts on their own (batches never mix tasks, so each task's wall time is its own; a
    row's tokens do not depend on its batch). Returns the generations in prompt order and {task: seconds}."""
    gens: list = [None] * len(prompts)
    walls = {}
    by_task: dict[str, list[int]] = {}  # task -> its prompts' indices, in suite order
    for i, e in enumerate(examples):
        by_task.setdefault(e.task, []).append(i)

    def decode(idx: list[int]) -> list:
        replay = _oracle(outputs, reference, idx) if spec.get("rule") == "oracle" else None
        return gen_model.generate_ids(
            [prompts[i] for i in idx], [ids[i] for i in idx], batch_size=batch_size, rule_for_batch=replay, **spec
        )

    # one untimed batch: a decoder's first call pays one-off costs (lazy imports, allocations, generate's set-up)
    # that would otherwise land on its first task's wall time (measured: 7.7 against 6.2 ms/answer)
    decode(next(iter(by_task.values()))[:batch_size])
    for task, idx in by_task.items():
        start = time.perf_counter()
        part = decode(idx)
        walls[task] = time.perf_counter() - start
        bar.update(1)
        for i, g in zip(idx, part):
            gens[i] = g
    return gens, walls


def warn_truncated(examples: list, answer_len: list[int], gen_length: int) -> None:
    """One line on stderr per task whose reference answers do not fit the canvas: such rows score low for the
    canvas, not the model."""
    for task in dict.fromkeys(e.task for e in examples):
        lengths = [n for n, e in zip(answer_len, examples) if e.task == task]
        cut = sum(n > gen_length for n in lengths)
        if cut:
            print(
                f"warning: gen_length={gen_length} truncates {cut / len(lengths):.0%} of {task}'s answers "
                f"(longest {max(lengths)} tokens): use gen_length >= {max(lengths) + 1}",
                file=sys.stderr,
                flush=True,
            )


def _decoder_rows(
    name: str, examples: list, gens: list[Generation], answer_len: list[int], gen_length: int, walls: dict[str, float]
) -> list[dict]:
    """One decoder's rows: per task, per task family, then macro (last). ``fill`` = mean reference-answer tokens
    / gen_length: how much of the canvas the task's answers take."""
    per_task, picks = [], {}
    for task in dict.fromkeys(e.task for e in examples):
        idx = [i for i, e in enumerate(examples) if e.task == task]
        picks[task] = [gens[i] for i in idx]
        correct = [is_correct(task, examples[i].prompt, gens[i].text) for i in idx]
        fill = sum(min(answer_len[i], gen_length) for i in idx) / len(idx) / gen_length
        per_task.append(_row(name, task, picks[task], correct, walls[task], fill))
    families = []
    for family in dict.fromkeys(r["family"] for r in per_task):
        members = [r for r in per_task if r["family"] == family]
        fam_gens = [g for r in members for g in picks[r["task"]]]
        families.append(_mean_row(name, family, family, members, fam_gens, sum(r["wall_s"] for r in members)))
    out = per_task + families + [_mean_row(name, "macro", "all", per_task, gens, sum(walls.values()))]
    for r in out:
        r["gen_length"] = gen_length
    return out


def decoder_points(eval_cfg: DictConfig, model: str) -> list[dict]:
    """Each decoder's frontier family, kind and model, for :func:`~dparallel.frontier.frontier`. Defaults: the
    family is the rule (``RULE@MODEL`` for a decoder on another model than the eval's or with a component, which
    then names the point's model), the kind follows the rule (a decoder on another model is a ``method`` point),
    the reference decoder is its own family."""
    points = []
    for spec in eval_cfg.decoders:
        rule, other = spec.get("rule") or "topk", spec.get("component") or spec.get("model")
        kind = decoder_kind(spec.name, rule, eval_cfg.reference, spec.get("kind"), other_model=bool(other))
        family = spec.get("frontier") or (spec.name if kind == "reference" else f"{rule}@{other}" if other else rule)
        points.append({"name": spec.name, "frontier": family, "kind": kind, "model": other or model})
    return points


def _oracle(outputs: dict[str, list[Generation]], reference: str | None, idx: list[int]):
    """Learn2PD's oracle replay of an earlier decoder's outputs in this eval: its NFE is the ceiling a filter
    trained on that decoder's trajectories can reach."""
    from dparallel.engine.oracle import OracleRule

    require(
        reference in outputs,
        f"the oracle decoder replays an earlier decoder: set reference to one of {sorted(outputs) or '(none yet)'}",
    )
    tokens = torch.tensor([outputs[reference][i].tokens for i in idx])  # [N, G]: the prompts decoded now
    return lambda start, end: OracleRule(tokens[start:end])


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_report(
    run_dir: Path, model: str, suite: str, rows: list[dict], frontier_section: dict | None = None, plot: bool = True
) -> dict:
    """Write eval.json (rows and the ``frontier`` section), eval.md and (optionally) pareto.png into ``run_dir``;
    return the eval.json object."""
    report = {"model": model, "suite": suite, "device": device_name(), "results": rows, "frontier": frontier_section}
    atomic_write_json(run_dir / "eval.json", report)
    table = markdown_table(rows) + ("\n" + frontier_table(report) if frontier_section else "")
    atomic_write_text(run_dir / "eval.md", table)
    if plot:
        per_task = [r for r in rows if r["task"] in TASK_FAMILY]
        canvases = "/".join(str(g) for g in sorted({r["gen_length"] for r in per_task}))
        title = f"{model} - {suite}, n={per_task[0]['n'] if per_task else 0} per task, gen_length {canvases}"
        pareto_plot(rows, frontier_section, run_dir / "pareto.png", title)
    return report


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| decoder | task | family | n | accuracy | 95% CI | NFE | TPF | fill | tokens/s | wall s | ms / answer |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['decoder']} | {r['task']} | {r['family']} | {r['n']} | {r['accuracy']:.3f} "
        f"| {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['nfe']:.1f} | {r['tpf']:.2f} | {r['fill']:.2f} "
        f"| {r['tokens_per_s']:.1f} | {r['wall_s']:.1f} | {1000 * r['wall_s'] / r['n']:.1f} |\n"
        for r in rows
    )
    return head + body


def pareto_plot(rows: list[dict], frontier_section: dict | None, out: Path, title: str = "") -> None:
    """Macro accuracy against mean NFE: each frontier family a line through its points, the reference a star.
    Without a frontier section, one labelled point per decoder."""
    from matplotlib import ticker

    from dparallel.core.plots import new_figure, save_figure

    macro = {r["decoder"]: r for r in rows if r["task"] == "macro"}
    fig, axes = new_figure(6, 4)
    ax = axes[0, 0]
    families = frontier_section["families"] if frontier_section else {n: {"points": [{"decoder": n}]} for n in macro}
    for name, fam in families.items():
        pts = sorted((macro[p["decoder"]]["nfe"], macro[p["decoder"]]["accuracy"]) for p in fam["points"])
        xs, ys = zip(*pts)
        if fam.get("kind") == "reference":
            ax.scatter(xs, ys, marker="*", s=140, color="black", zorder=3, label=name)
        else:
            ax.plot(xs, ys, marker="o", label=name)
    if frontier_section:
        ax.axhline(frontier_section["target"], color="gray", ls="--", lw=0.8, label="target")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.set_xlabel("NFE (full-model forwards per answer, log)")
    ax.set_ylabel("macro accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, out)


def evaluate_recipe(cfg: DictConfig, generator: Pipeline | None = None) -> dict:
    """Run the recipe's eval section on ``model.path`` (or the given generator); write the reports."""
    run_dir = open_run_dir(cfg)
    save_recipe(cfg, run_dir)
    return evaluate_into(cfg, run_dir, cfg.model.path, generator)


def evaluate_into(cfg: DictConfig, run_dir: Path, model_path: str, generator: Pipeline | None = None) -> dict:
    """Evaluate ``model_path`` with the recipe's eval section; write eval.json/.md/pareto.png into ``run_dir``."""
    from dparallel.commands.frontier import frontier
    from dparallel.data.suite import validate_tasks

    validate_tasks(list(cfg.eval.suite.tasks))  # fail before loading any weights
    for spec in cfg.eval.decoders:
        DecodeConfig(**decode_options(OmegaConf.to_container(spec))).validate()
    generator = generator or load(
        model_path,
        family=cfg.model.family,
        device=cfg.model.device,
        dtype=weights_dtype(cfg.model.dtype, cfg.model.device),
        revision=cfg.model.revision,
    )
    suite = cfg.eval.suite
    print(f"evaluating {model_path} on {len(suite.tasks)} tasks x {suite.n_per_task} ({suite.split} split)", flush=True)

    def load_model(path: str) -> Pipeline:
        return load(path, device=cfg.model.device, dtype=weights_dtype(cfg.model.dtype, cfg.model.device))

    rows = evaluate(generator, cfg.eval, load_model=load_model)
    points = decoder_points(cfg.eval, model_path)
    section = None
    if any(p["name"] == cfg.eval.reference for p in points):  # no reference decoder, no target to read at
        section = frontier(rows, points, cfg.eval.reference, cfg.eval.margin, model_path)
    report = write_report(run_dir, model_path, f"suite/{suite.split}", rows, section, plot=cfg.eval.plot)
    print(f"report: {run_dir / 'eval.md'}", flush=True)
    return report
