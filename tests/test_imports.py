"""Imports run one way: no import circle among the package's modules, and no module imports
from a layer above its own. Every import counts: those inside functions (they run too) and
those under ``if TYPE_CHECKING:`` (a type is a dependency too). Read with ``ast``, nothing is
imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tokenunify"

# lowest first; a module is in the layer of the longest prefix listed
LAYERS = [
    ("base", ["tokenunify", "tokenunify.errors", "tokenunify.settings", "tokenunify.native"]),
    ("io, model, data", ["tokenunify.io", "tokenunify.model", "tokenunify.data",
                         "tokenunify.objectives", "tokenunify.affinities", "tokenunify.metrics",
                         "tokenunify.skeletons", "tokenunify.run_length",
                         "tokenunify.checks"]),
    ("configuration", ["tokenunify.config", "tokenunify.runs", "tokenunify.cluster"]),
    ("stages", ["tokenunify.download", "tokenunify.tokenize", "tokenunify.train",
                "tokenunify.inference", "tokenunify.agglomerate", "tokenunify.evaluate",
                "tokenunify.export", "tokenunify.viewer",
                "tokenunify.report"]),
    ("command line", ["tokenunify.cli"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            # "from pkg import submodule" imports the submodule, not (only) the package
            found |= {s for s in subs if s in known}
            if any(s not in known for s in subs):
                found.add(base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name} is in no layer: add it to LAYERS"
    return rank


def test_no_import_circle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_import_from_a_higher_layer():
    g = graph()
    up = sorted(f"{m} ({LAYERS[layer(m)][0]}) -> {n} ({LAYERS[layer(n)][0]})"
                for m, deps in g.items() for n in deps if layer(n) > layer(m))
    assert not up, "imports from a higher layer:\n  " + "\n  ".join(up)
