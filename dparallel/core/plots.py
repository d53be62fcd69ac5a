"""Plots a person looks at first: written atomically as PNG with the headless Agg backend."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def new_figure(width: float = 6, height: float = 3.5, ncols: int = 1):
    """A matplotlib (figure, axes) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), dpi=120, squeeze=False)


def save_figure(fig, out: Path) -> None:
    """Save ``fig`` to ``out`` through a temporary file (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged metric of a run as (step, value) pairs, over all attempts (logs/version_*/metrics.csv, in
    order, so a resumed run's curve continues where the killed one stopped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for log in sorted(Path(run_dir).glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        for row in csv.DictReader(log.open()):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def training_curves(run_dir: Path, out: Path | None = None, title: str = "") -> Path | None:
    """``RUN_DIR/train.png``: one panel per logged metric (loss first, the learning rate last) against the step,
    under ``title``. Returns the file, or None when nothing was logged."""
    series = read_metrics(run_dir)
    names = sorted(series, key=lambda k: (k != "train/loss", k == "train/lr", k))
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, _ = new_figure(4 * cols, 2.6 * rows, ncols=1)
    fig.clear()
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = zip(*series[name])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or Path(run_dir).name, fontsize=10)
    out = out or Path(run_dir) / "train.png"
    save_figure(fig, out)
    return out
