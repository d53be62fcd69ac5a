"""``dparallel data inspect DIR``: counts, correctness, step/TPF histograms and samples with their unmasking order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from dparallel.data.trajectory import TOKENIZER_DIR, load_trajectories, read_manifest, state_at

MASKED = "░"


def _tokenizer(folder: Path, manifest: dict):
    """The recorded tokenizer (OUT/tokenizer), or None: then tokens are shown as ids."""
    if not manifest.get("tokenizer") or not (folder / manifest["tokenizer"]).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    except Exception:
        return None


def _answer_length(tokens: np.ndarray, ids: dict) -> int:
    ends = np.flatnonzero(np.isin(tokens, [ids.get("eos", -1), ids.get("eot", -1)]))
    return int(ends[0]) + 1 if ends.size else len(tokens)


def histogram(values: list[float], bins: int = 8, width: int = 40) -> list[str]:
    """A text histogram, one line per bin: ``lo..hi  count  ####`` (integer bins for integer data)."""
    if not values:
        return ["  (none)"]
    values = np.asarray(values, dtype=float)
    lo, hi = float(values.min()), float(values.max())
    integer = bool(np.all(values == np.round(values)))
    if integer:
        step = max(int(np.ceil((hi - lo + 1) / bins)), 1)
        edges = np.arange(lo, hi + step + 1, step)[: int(np.ceil((hi - lo + 1) / step)) + 1]
        labels = [f"{a:.0f}" if step == 1 else f"{a:.0f}..{b - 1:.0f}" for a, b in zip(edges[:-1], edges[1:])]
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, bins + 1)
        labels = [f"{a:.2f}..{b:.2f}" for a, b in zip(edges[:-1], edges[1:])]
    counts, _ = np.histogram(values, bins=edges)
    top = max(int(counts.max()), 1)
    return [
        f"  {label:>13}  {int(n):>6}  {'#' * max(int(round(width * n / top)), 1 if n else 0)}"
        for label, n in zip(labels, counts)
    ]


def _pieces(tokens: np.ndarray, tokenizer) -> list[str]:
    if tokenizer is None:
        return [f"{t} " for t in tokens.tolist()]
    return [tokenizer.decode([t]).replace("\n", "⏎") or "∅" for t in tokens.tolist()]


def render_sample(r: dict, ids: dict, tokenizer, n_states: int = 6) -> list[str]:
    """A record as text: its meta, each answer token annotated with its commit step, and a few states x_s."""
    tokens, order = np.asarray(r["tokens"]), np.asarray(r["order"])
    steps, meta = int(r["steps"]), r["meta"]
    n = _answer_length(tokens, ids)
    tokens, order = tokens[:n], order[:n]
    pieces = _pieces(tokens, tokenizer)
    lines = [
        f"id {meta['id']}  task {meta.get('task') or '-'}  correct {meta.get('correct')}  steps {steps}  "
        f"answer tokens {n}  TPF {n / max(steps, 1):.2f}",
        f"  prompt: {meta['prompt']!r}",
        f"  output: {meta['output']!r}",
    ]
    if meta.get("answer") is not None:
        lines.append(f"  reference: {meta['answer']!r}")
    lines.append("  unmasking order (token@step):")
    cells = [f"{p}@{int(s)}" for p, s in zip(pieces, order)]
    for start in range(0, len(cells), 12):
        lines.append("    " + " ".join(cells[start : start + 12]))
    lines.append(f"  states x_s = where(order < s, tokens, MASK) ({MASKED} = masked):")
    shown = sorted({int(round(s)) for s in np.linspace(0, steps, n_states)})
    for s in shown:
        state = state_at(tokens, order, s, -1)
        text = "".join(p if t != -1 else MASKED * max(len(p), 1) for p, t in zip(pieces, state.tolist()))
        lines.append(f"    s={s:<4} {text}")
    return lines


def inspect(path: str | Path, samples: int = 1) -> str:
    """The report ``dparallel data inspect`` prints."""
    folder = Path(path)
    manifest = read_manifest(folder)
    ds = load_trajectories(folder)
    ids = manifest.get("ids", {})
    counts = manifest.get("counts", {})
    teacher, decode = manifest.get("teacher", {}), manifest.get("decode", {})
    meta = ds["meta"]
    steps = [int(s) for s in ds["steps"]]
    tokens = ds.with_format("numpy")["tokens"]
    answer = [_answer_length(np.asarray(t), ids) for t in tokens]
    tpf = [a / max(s, 1) for a, s in zip(answer, steps)]
    checked = [m for m in meta if m["correct"] is not None]
    lines = [
        f"trajectories {folder}  (schema {manifest['schema_version']}, {len(manifest['shards'])} shards"
        f"{', dense pred/conf' if 'pred' in ds.column_names else ''})",
        f"teacher {teacher.get('path')} ({teacher.get('family')}, revision {teacher.get('revision') or '-'}); "
        f"rule {decode.get('rule')}, gen_length {decode.get('gen_length')}, block_length {decode.get('block_length')}",
        f"source {manifest.get('source', {}).get('name')}: {counts.get('prompts')} prompts -> {len(ds)} records",
    ]
    if checked:
        right = sum(m["correct"] for m in checked)
        lines.append(f"correct {right}/{len(checked)} ({100 * right / len(checked):.1f}%)")
        tasks = Counter(m["task"] for m in checked if m["task"])
        if len(tasks) > 1:
            per = {t: sum(m["correct"] for m in checked if m["task"] == t) for t in tasks}
            lines.append("  by task: " + ", ".join(f"{t} {per[t]}/{tasks[t]}" for t in sorted(tasks)))
    else:
        lines.append("correct: not checked")
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    lines += [
        f"steps per record (mean {mean(steps):.1f}):",
        *histogram(steps),
        f"TPF, answer tokens per step (mean {mean(tpf):.2f}):",
        *histogram(tpf),
    ]
    tokenizer = _tokenizer(folder, manifest)
    for i in range(min(samples, len(ds))):
        head, *rest = render_sample(ds[i], ids, tokenizer)
        lines += ["", f"sample {i}: {head}", *rest]
    return "\n".join(lines)
