"""The accuracy/NFE frontier of an eval run: which decoder family reaches the reference's accuracy in the fewest
full-model forwards (BENCHMARK.md's headline).

A *decoder family* is one rule on one model (``confidence`` at several thresholds, ``topk`` at several tokens per
step, a method's rule on its component): each decoder of the eval is one point (NFE, accuracy) of its family.
``target`` = the reference decoder's accuracy - ``margin``; a family's ``nfe_at_target`` is the lowest NFE of its
points whose accuracy is >= target (None when none is). The same is computed over the macro rows (all tasks) and
over each task family's rows (``one-answer``, ``many-answers``, ``reasoning``), so a method's gain is read where
the problem lives.
"""

from __future__ import annotations

import math

from dparallel.core.errors import require

KINDS = ("reference", "heuristic", "method", "oracle")
# Rules whose decisions come from a trained component: their points are a method's, not a heuristic's.
METHOD_RULES = ("filter", "joint", "policy")


def wilson_interval(correct: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a binomial proportion: [lo, hi]; well behaved at 0 and 1 (unlike p +- z se)."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def decoder_kind(name: str, rule: str, reference: str, kind: str | None = None, other_model: bool = False) -> str:
    """``kind`` when the decoder spec sets one; else reference (the reference decoder, on whichever model), oracle,
    method (a trained component's rule, or any rule on another model than the eval's: a student) or heuristic."""
    if kind is not None:
        require(kind in KINDS, f"decoder {name}: kind={kind!r}: choose from {', '.join(KINDS)}")
        return kind
    if name == reference:
        return "reference"
    if rule == "oracle":
        return "oracle"
    return "method" if other_model or rule in METHOD_RULES else "heuristic"


def frontier(rows: list[dict], decoders: list[dict], reference: str, margin: float, model: str) -> dict:
    """The ``frontier`` section of eval.json from its rows.

    ``decoders``: one dict per decoder with ``name``, ``frontier`` (its family's name), ``kind`` and ``model``.
    Returns ``{"reference", "target", "families": {...}, "task_families": {family: {"target", "families"}}}``.
    """
    names = [d["name"] for d in decoders]
    require(reference in names, f"eval.reference={reference!r} is not a decoder of this eval: choose from {names}")
    section = _section([r for r in rows if r["task"] == "macro"], decoders, reference, margin, model)
    groups = list(dict.fromkeys(r["family"] for r in rows if r["task"] == r["family"]))  # the suite's order
    section["task_families"] = {
        g: _section([r for r in rows if r["task"] == g], decoders, reference, margin, model) for g in groups
    }
    return {"reference": reference, **section}


def _section(rows: list[dict], decoders: list[dict], reference: str, margin: float, model: str) -> dict:
    """Target and families over one set of rows (one row per decoder: the macro rows or one task family's)."""
    by_name = {r["decoder"]: r for r in rows}
    target = round(by_name[reference]["accuracy"] - margin, 6)
    families: dict[str, dict] = {}
    for d in decoders:
        row = by_name[d["name"]]
        fam = families.setdefault(
            d["frontier"], {"points": [], "nfe_at_target": None, "kind": d["kind"], "model": d.get("model") or model}
        )
        fam["points"].append({"decoder": d["name"], "nfe": round(row["nfe"], 3), "accuracy": round(row["accuracy"], 4)})
    for fam in families.values():
        reached = [p["nfe"] for p in fam["points"] if p["accuracy"] >= target]
        fam["nfe_at_target"] = min(reached) if reached else None
    return {"target": target, "families": families}


def best_heuristic(section: dict) -> tuple[str | None, float | None]:
    """(family, nfe_at_target) of the heuristic family that reaches the target in the fewest forwards."""
    reached = [
        (f["nfe_at_target"], name)
        for name, f in section["families"].items()
        if f["kind"] == "heuristic" and f["nfe_at_target"] is not None
    ]
    return (min(reached)[1], min(reached)[0]) if reached else (None, None)


def frontier_table(report: dict) -> str:
    """Markdown: each decoder family's nfe_at_target, macro and per task family, and the target it was read at."""
    fr = report["frontier"]
    groups = list(fr["task_families"])
    head = "| family | kind | macro | " + " | ".join(groups) + " |\n"
    head += "|---|---|---|" + "---|" * len(groups) + "\n"
    targets = "| target | | " + " | ".join(f"{s['target']:.3f}" for s in [fr, *fr["task_families"].values()]) + " |\n"

    def cell(section: dict, name: str) -> str:
        value = section["families"].get(name, {}).get("nfe_at_target")
        return "-" if value is None else f"{value:.1f}"

    body = "".join(
        f"| {name} | {f['kind']} | {cell(fr, name)} | "
        + " | ".join(cell(fr["task_families"][g], name) for g in groups)
        + " |\n"
        for name, f in fr["families"].items()
    )
    return "NFE at target (lowest NFE whose accuracy >= target; - = never reached)\n\n" + head + targets + body
