"""The package's layers: every module imports only its own layer and the ones below, and no import circle exists
(function-local imports count: they are the same dependency, deferred). docs/ARCHITECTURE.md draws the layers."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# installed package -> folder (pyproject's package-dir)
FOLDERS = {"dparallel": "dparallel", "dparallel.data": "data", "dparallel.filters": "filters"}
FOLDERS |= {"dparallel.samplers": "samplers", "dparallel.ar2diff": "ar2diff"}
# bottom first; a module belongs to the layer of its longest matching prefix
LAYERS = [
    ("core", ["dparallel.core"]),
    ("adapters", ["dparallel.adapters", "dparallel.ar2diff.family", "dparallel.ar2diff.masks"]),
    (
        "engine",
        [
            "dparallel.engine",
            "dparallel.ar2diff.cache",
            "dparallel.ar2diff.decoding",
            "dparallel.filters.rule",
            "dparallel.samplers.joint",
            "dparallel.samplers.policy",
        ],
    ),
    ("data", ["dparallel.data", "dparallel.ar2diff.config", "dparallel.filters.config", "dparallel.samplers.config"]),
    ("methods", ["dparallel.methods", "dparallel.filters", "dparallel.samplers", "dparallel.ar2diff"]),
    ("commands", ["dparallel.commands"]),
    ("cli", ["dparallel.cli", "dparallel.__main__", "dparallel"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for file in (ROOT / folder).rglob("*.py"):
            rel = file.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if not any(
                name.startswith(other + ".") for other in FOLDERS if other != package and len(other) > len(package)
            ):
                found[name] = file
    return found


def layer_of(module: str) -> int:
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return index


def imports(file: Path, known: set[str]) -> set[str]:
    """The package modules ``file`` imports (``from X import name`` of a submodule counts as that submodule)."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(file, set(mods)) - {name} for name, file in mods.items()}


def test_every_import_points_down_or_sideways():
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in graph().items()
        for b in targets
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    edges, state, stack, circles = graph(), {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


def test_modules_stay_small():
    big = [f"{f.relative_to(ROOT)}: {n}" for f in modules().values() if (n := len(f.read_text().splitlines())) > 400]
    assert not big, big


def test_functions_stay_small():
    long = [
        f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for f in modules().values()
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long
