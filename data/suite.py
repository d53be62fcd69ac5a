"""The synthetic task suite (v2): ParallelBench-style tasks whose answers fill a 32-token canvas, in three families.

- ``one-answer`` (the control: parallel decoding should be nearly free): ``copy``, ``reverse``, ``sort`` and
  ``insert_index`` on strings of distinct letters (each letter is one token, as each name is in ParallelBench's
  waiting-line tasks);
- ``many-answers`` (a joint constraint ties the tokens; marginals decoded together pick different answers):
  ``shuffle`` (any permutation that differs from the input), ``insert_random`` (the letter at any position),
  ``distinct`` (k distinct letters of a category) and ``latin_square`` (any 4x4 Latin square over 4 symbols);
- ``reasoning`` (worked arithmetic whose solution may be written in several valid forms, the GSM8K-like case):
  ``sum`` (add digits in any order, each step written either way round) and ``chain`` (apply operations left to
  right; the operands of ``+`` and ``*`` in either order). Verified step by step and on the final ``####N``.

Every example is a pure function of ``(task, split, index, seed)``; ``train``/``test``/``longer`` are disjoint by
seed. ``test`` draws the upper part of ``train``'s lengths (so answers fill >= 60% of the canvas); ``longer``
draws inputs longer than any in ``train`` where the canvas has room (letter tasks: 24-25 letters), and the
longest ``train`` form where it has not (``latin_square``; ``sum`` with 4 digits, ``chain`` with 3 operations).
The verifiers (:func:`is_correct`) accept every valid answer; the reference answer is one of them.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from dparallel.core.errors import require

GEN_LENGTH = 32  # the default canvas: the longest answer (31 tokens) plus one EOS
SPLITS: tuple[str, ...] = ("train", "test", "longer")
FAMILIES: dict[str, tuple[str, ...]] = {
    "one-answer": ("copy", "reverse", "sort", "insert_index"),
    "many-answers": ("shuffle", "insert_random", "distinct", "latin_square"),
    "reasoning": ("sum", "chain"),
}
TASKS: tuple[str, ...] = tuple(t for tasks in FAMILIES.values() for t in tasks)
TASK_FAMILY: dict[str, str] = {t: fam for fam, tasks in FAMILIES.items() for t in tasks}
# Distinct seeds per split keep the splits disjoint (up to chance collisions).
_SPLIT_SEED = {"train": 0, "test": 1_000_003, "longer": 2_000_029}
# Letters per list: train spans short to long, test its upper part (fill), longer goes past train's longest.
_LIST_LENGTHS = {"train": (14, 23), "test": (18, 23), "longer": (24, 25)}
CATEGORIES: dict[str, str] = {"lowercase": string.ascii_lowercase, "uppercase": string.ascii_uppercase}


@dataclass(frozen=True)
class Example:
    """One prompt with one valid reference answer (many-answers and reasoning tasks accept others too)."""

    task: str
    split: str
    index: int
    prompt: str
    answer: str

    @property
    def example_id(self) -> str:
        return f"{self.task}/{self.split}/{self.index}"

    @property
    def family(self) -> str:
        return TASK_FAMILY[self.task]


def _letters(rng: random.Random, split: str, extra: int = 0) -> str:
    """Distinct lowercase letters, as many as the split's list length (minus ``extra`` for tasks that add one)."""
    lo, hi = _LIST_LENGTHS[split]
    return "".join(rng.sample(string.ascii_lowercase, rng.randint(lo, hi) - extra))


def _copy(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, split)
    return f"copy: {s}\n", s


def _reverse(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, split)
    return f"reverse: {s}\n", s[::-1]


def _sort(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, split)
    return f"sort: {s}\n", "".join(sorted(s))


def _insert_index(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, split, extra=1)
    c = rng.choice([ch for ch in string.ascii_lowercase if ch not in s])
    i = rng.randint(1, len(s) + 1)  # 1-based position the new letter takes
    return f"insert {c} at {i}: {s}\n", s[: i - 1] + c + s[i - 1 :]


def _shuffle(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, split)
    out = s
    while out == s:
        out = "".join(rng.sample(s, len(s)))
    return f"shuffle: {s}\n", out


def _insert_random(rng: random.Random, split: str) -> tuple[str, str]:
    s = _letters(rng, split, extra=1)
    c = rng.choice([ch for ch in string.ascii_lowercase if ch not in s])
    i = rng.randint(0, len(s))
    return f"insert {c}: {s}\n", s[:i] + c + s[i:]


def _distinct(rng: random.Random, split: str) -> tuple[str, str]:
    category = rng.choice(sorted(CATEGORIES))
    k = rng.randint(*_LIST_LENGTHS[split])
    return f"{k} distinct {category}:\n", "".join(rng.sample(CATEGORIES[category], k))


def _latin_square(rng: random.Random, split: str) -> tuple[str, str]:
    symbols = "".join(rng.sample(string.ascii_lowercase, 4))
    return f"latin square: {symbols}\n", ", ".join(random_latin_square(rng, symbols))


@functools.cache
def _latin_squares(n: int = 4) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Every n x n Latin square over 0..n-1 (576 for n = 4), by row-wise backtracking."""
    perms = list(itertools.permutations(range(n)))

    def extend(rows: tuple) -> list:
        if len(rows) == n:
            return [rows]
        ok = [p for p in perms if all(p[c] != r[c] for r in rows for c in range(n))]
        return [sq for p in ok for sq in extend(rows + (p,))]

    return tuple(extend(()))


def random_latin_square(rng: random.Random, symbols: str) -> list[str]:
    """A uniformly random Latin square over ``symbols`` (one of all of them, drawn by ``rng``), as rows."""
    square = rng.choice(_latin_squares(len(symbols)))
    return ["".join(symbols[i] for i in row) for row in square]


def _sum(rng: random.Random, split: str) -> tuple[str, str]:
    n = 4 if split == "longer" else rng.randint(3, 4)
    digits = [rng.randint(1, 9) for _ in range(n)]
    order = rng.sample(digits, n)  # any order of adding is valid; the data varies it
    steps, total = [], order[0]
    for d in order[1:]:
        a, b = (total, d) if rng.random() < 0.5 else (d, total)
        total += d
        steps.append(f"{a}+{b}={total}")
    return f"sum: {' '.join(map(str, digits))}\n", ",".join(steps) + f"####{total}"


def _chain(rng: random.Random, split: str) -> tuple[str, str]:
    n_ops = 3 if split == "longer" else rng.randint(2, 3)
    while True:
        value = start = rng.randint(2, 20)
        ops, steps = [], []
        for _ in range(n_ops):
            op = rng.choice([o for o, ok in (("+", True), ("-", value > 2), ("*", value <= 30)) if ok])
            n = rng.randint(2, 3) if op == "*" else rng.randint(1, min(9, value - 1) if op == "-" else 9)
            new = value + n if op == "+" else value - n if op == "-" else value * n
            a, b = (value, n) if op == "-" or rng.random() < 0.5 else (n, value)
            ops.append(f"{op}{n}")
            steps.append(f"{a}{op}{b}={new}")
            value = new
        answer = ",".join(steps) + f"####{value}"
        if len(answer) < GEN_LENGTH:
            return f"chain: {start} {' '.join(ops)}\n", answer


_MAKERS: dict[str, Callable[[random.Random, str], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "insert_index": _insert_index,
    "shuffle": _shuffle,
    "insert_random": _insert_random,
    "distinct": _distinct,
    "latin_square": _latin_square,
    "sum": _sum,
    "chain": _chain,
}
assert tuple(_MAKERS) == TASKS


def validate_tasks(tasks: list[str] | tuple[str, ...]) -> None:
    """One-line errors for an empty task list or a task name the suite does not have."""
    require(len(tasks) > 0, f"the task list is empty: name at least one of {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in _MAKERS]
    require(not unknown, f"unknown task {', '.join(map(repr, unknown))}: choose from {', '.join(TASKS)}")


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
    validate_tasks(tasks)
    require(split in _SPLIT_SEED, f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    return [make_example(t, split, i, seed) for i in range(n_per_task) for t in tasks]


def is_correct(task: str, prompt: str, output: str) -> bool:
    """Verify an output against the prompt, accepting every valid answer (see the module docstring)."""
    if task not in _VERIFIERS:
        raise ValueError(f"unknown task {task!r}")
    return _VERIFIERS[task](prompt.strip(), output.strip())


def _arg(prompt: str) -> str:
    return prompt.split(": ", 1)[1]


def _insert_args(prompt: str) -> tuple[str, int | None, str]:
    """'insert c at i: s' -> (c, i, s); 'insert c: s' -> (c, None, s)."""
    head, s = prompt.split(": ", 1)
    words = head.split(" ")
    return words[1], (int(words[3]) if len(words) == 4 else None), s


def _check_insert(prompt: str, out: str) -> bool:
    c, i, s = _insert_args(prompt)
    if len(out) != len(s) + 1 or out.count(c) != 1 or out.replace(c, "") != s:
        return False
    return i is None or out.index(c) == i - 1


def _check_distinct(prompt: str, out: str) -> bool:
    k, _, category = prompt.rstrip(":").split(" ")
    return len(out) == int(k) and len(set(out)) == len(out) and set(out) <= set(CATEGORIES[category])


def _check_latin(prompt: str, out: str) -> bool:
    symbols = sorted(_arg(prompt))
    rows = out.split(", ")
    cols = ["".join(col) for col in zip(*rows)] if all(len(r) == len(symbols) for r in rows) else []
    return len(rows) == len(symbols) == len(cols) and all(sorted(line) == symbols for line in rows + cols)


_STEP = re.compile(r"^(\d+)([-+*])(\d+)=(\d+)$")


def _parse_worked(out: str) -> tuple[list[tuple[int, str, int, int]], int] | None:
    """'a+b=c,c*d=e####e' -> ([(a, '+', b, c), (c, '*', d, e)], e); None when malformed."""
    body, sep, final = out.partition("####")
    if not sep or not final.isdigit() or not body:
        return None
    steps = []
    for text in body.split(","):
        m = _STEP.match(text)
        if m is None:
            return None
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        steps.append((a, op, b, c))
    return steps, int(final)


def _check_sum(prompt: str, out: str) -> bool:
    """Each step adds one unused digit to the running total (either way round); every digit used once."""
    parsed = _parse_worked(out)
    if parsed is None:
        return False
    steps, final = parsed
    left = sorted(int(d) for d in _arg(prompt).split(" "))
    total = None
    for a, op, b, c in steps:
        if op != "+" or a + b != c:
            return False
        if total is None:  # the first step adds two digits
            pair = [a, b]
        elif total in (a, b):
            pair = [b if a == total else a]
        else:
            return False
        for d in pair:
            if d not in left:
                return False
            left.remove(d)
        total = c
    return not left and total == final


def _check_chain(prompt: str, out: str) -> bool:
    """Each step applies the next operation to the running value; + and * may write their operands either way."""
    parsed = _parse_worked(out)
    words = _arg(prompt).split(" ")
    if parsed is None or len(parsed[0]) != len(words) - 1:
        return False
    steps, final = parsed
    value = int(words[0])
    for (a, op, b, c), word in zip(steps, words[1:]):
        want_op, n = word[0], int(word[1:])
        new = value + n if want_op == "+" else value - n if want_op == "-" else value * n
        operands_ok = (a, b) == (value, n) or (want_op != "-" and (a, b) == (n, value))
        if op != want_op or not operands_ok or c != new:
            return False
        value = new
    return final == value


_VERIFIERS: dict[str, Callable[[str, str], bool]] = {
    "copy": lambda p, o: o == _arg(p),
    "reverse": lambda p, o: o == _arg(p)[::-1],
    "sort": lambda p, o: o == "".join(sorted(_arg(p))),
    "insert_index": _check_insert,
    "shuffle": lambda p, o: sorted(o) == sorted(_arg(p)) and o != _arg(p),
    "insert_random": _check_insert,
    "distinct": _check_distinct,
    "latin_square": _check_latin,
    "sum": _check_sum,
    "chain": _check_chain,
}
