"""The synthetic task suite: small, verifiable tasks that differ in how answer tokens depend on each other.

- low dependency: ``copy``, ``reverse``, ``sort`` (each answer character depends on the prompt only);
- sequential dependency: ``add`` (column-wise addition with carries, written as a worked solution) and ``word``
  (templated multi-step arithmetic word problems with worked solutions and a final ``#### N`` answer);
- joint dependency: ``distinct`` (list k distinct items of a category; decoding items independently in
  parallel makes duplicates).

Every example is a pure function of ``(task, split, index, seed)``, so splits are reproducible and disjoint by
seed. The ``longer`` split draws longer inputs than ``train``/``test`` to measure length generalisation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("copy", "reverse", "sort", "add", "word", "distinct")
SPLITS: tuple[str, ...] = ("train", "test", "longer")
# Distinct seeds per split keep the splits disjoint (up to chance collisions on tiny inputs).
_SPLIT_SEED = {"train": 0, "test": 1_000_003, "longer": 2_000_029}

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "pear", "fig", "kiwi", "plum", "lime", "mango", "grape", "peach", "lemon"),
    "colors": ("red", "blue", "green", "pink", "gray", "black", "white", "brown", "cyan", "gold"),
    "animals": ("cat", "dog", "cow", "fox", "owl", "bee", "rat", "pig", "hen", "yak"),
    "tools": ("saw", "axe", "file", "drill", "hammer", "wrench", "chisel", "rake", "hoe", "vise"),
}
_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Max", "Sam", "Tom", "Liz", "Kim")
_ITEMS = ("apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps")


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer; ``answer`` is one valid completion (``distinct`` has many)."""

    task: str
    split: str
    index: int
    prompt: str
    answer: str

    @property
    def example_id(self) -> str:
        return f"{self.task}/{self.split}/{self.index}"


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def _lengths(split: str) -> tuple[int, int]:
    return (13, 20) if split == "longer" else (3, 12)


def _copy(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, *_lengths(split))
    return f"copy: {s}\n", s


def _reverse(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, *_lengths(split))
    return f"reverse: {s}\n", s[::-1]


def _sort(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, *_lengths(split))
    return f"sort: {s}\n", "".join(sorted(s))


def _add(rng: random.Random, split: str) -> tuple[str, str]:
    lo, hi = (5, 6) if split == "longer" else (1, 4)
    a = rng.randint(10 ** (rng.randint(lo, hi) - 1), 10**hi - 1)
    b = rng.randint(10 ** (rng.randint(lo, hi) - 1), 10**hi - 1)
    return f"add: {a}+{b}\n", add_solution(a, b)


def add_solution(a: int, b: int) -> str:
    """Column-wise worked solution, least significant column first: ``4+7+0=11,3+6+1=10,... ####N``.

    Each column shows its two digits, the carry in and the two-digit column sum (carry out, digit), so
    every column depends on the one before it: a sequential dependency chain.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    cols, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        cols.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return ",".join(cols) + f" ####{a + b}"


def _word(rng: random.Random, split: str) -> tuple[str, str]:
    # Small numbers (operands 1-9, running value 1-30) keep each step's arithmetic learnable by a tiny model;
    # the difficulty is the chain: every step's result is the next step's operand.
    n_ops = rng.randint(4, 5) if split == "longer" else rng.randint(2, 3)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 15)
    sentences, steps = [f"{name} has {value} {item}."], []
    for _ in range(n_ops):
        choices = [op for op, ok in (("+", value <= 21), ("-", value > 1), ("*", value <= 10)) if ok]
        op = rng.choice(choices)
        if op == "+":
            n = rng.randint(1, 9)
            sentences.append(f"Gets {n} more.")
            new = value + n
        elif op == "-":
            n = rng.randint(1, min(9, value - 1))
            sentences.append(f"Gives {n} away.")
            new = value - n
        else:
            n = 2 if value > 7 else rng.randint(2, 3)
            sentences.append(f"Then {'doubles' if n == 2 else 'triples'}.")
            new = value * n
        steps.append(f"{value}{op}{n}={new}.")
        value = new
    prompt = " ".join(sentences) + f" How many {item}?\n"
    return prompt, " ".join(steps) + f" ####{value}"


def _distinct(rng: random.Random, split: str) -> tuple[str, str]:
    category = rng.choice(sorted(CATEGORIES))
    k = rng.randint(5, 7) if split == "longer" else rng.randint(2, 4)
    items = rng.sample(CATEGORIES[category], k)
    return f"list {k} {category}:\n", ",".join(items)


_MAKERS: dict[str, Callable[[random.Random, str], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
    "word": _word,
    "distinct": _distinct,
}


def make_example(task: str, split: str, index: int, seed: int = 0) -> Example:
    """Return example ``index`` of ``task`` in ``split``; deterministic in all four arguments."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if split not in _SPLIT_SEED:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    rng = random.Random(f"{task}|{_SPLIT_SEED[split] + seed}|{index}")
    prompt, answer = _MAKERS[task](rng, split)
    return Example(task, split, index, prompt, answer)


def make_split(tasks: list[str] | tuple[str, ...], split: str, n_per_task: int, seed: int = 0) -> list[Example]:
    """``n_per_task`` examples of each task, tasks interleaved so any prefix is balanced."""
    return [make_example(t, split, i, seed) for i in range(n_per_task) for t in tasks]


_FINAL = re.compile(r"####\s*(-?\d+)\s*$")


def is_correct(task: str, prompt: str, output: str) -> bool:
    """Verify an output. ``add``/``word`` check the final ``####N`` against the true value; ``distinct``
    accepts any k distinct members of the category; the rest need an exact string."""
    output = output.strip()
    if task in ("copy", "reverse", "sort"):
        s = prompt.split(": ", 1)[1].strip()
        want = {"copy": s, "reverse": s[::-1], "sort": "".join(sorted(s))}[task]
        return output == want
    if task == "add":
        a, b = (int(x) for x in prompt.split(": ", 1)[1].strip().split("+"))
        m = _FINAL.search(output)
        return m is not None and int(m.group(1)) == a + b
    if task == "word":
        m = _FINAL.search(output)
        return m is not None and int(m.group(1)) == _word_value(prompt)
    if task == "distinct":
        k_str, category = prompt.split(" ")[1:3]
        items = output.split(",")
        members = CATEGORIES[category.rstrip(":\n")]
        return len(items) == int(k_str) and len(set(items)) == len(items) and all(i in members for i in items)
    raise ValueError(f"unknown task {task!r}")


def _word_value(prompt: str) -> int:
    """Replay a word problem's sentences to its true final value."""
    value = int(re.match(r"\w+ has (\d+)", prompt).group(1))
    for verb, n in re.findall(r"(Gets|Gives|Then) (\d+|doubles|triples)", prompt):
        n = {"doubles": 2, "triples": 3}.get(n) or int(n)
        value = value + n if verb == "Gets" else value - n if verb == "Gives" else value * n
    return value
