"""The package layout: no import cycles between sgmft's modules, and inference is a leaf
(importing ``sgmft.predict`` loads neither Lightning nor the training code nor the CLI)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sgmft

SRC = Path(sgmft.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the sgmft modules it imports anywhere in its body (top level or inside a
    function: a lazy import is still a dependency). A submodule's implicit import of its
    parent package is not an edge; ``from pkg import name`` points at ``pkg.name`` when that
    is a module, else at ``pkg``."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        edges.add(f"{base}.{a.name}")
                    elif base in mods:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_and_from_imports():
    g = import_graph()
    assert "sgmft.predict.features" in g["sgmft.predict"]          # from pkg import name (module)
    assert "sgmft.features" in g["sgmft.features.shards"]           # from pkg import name (object)
    assert "sgmft.train" in g["sgmft.cli"]                          # import inside a function


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


CLI_MODULES = ("sgmft.cli", "sgmft.__main__")   # ``python -m sgmft`` is the command line too


def test_library_never_imports_the_cli():
    g = import_graph()
    bad = sorted(m for m, deps in g.items() if not m.startswith(CLI_MODULES)
                 and any(d == "sgmft.cli" or d.startswith("sgmft.cli.") for d in deps))
    assert bad == []


def test_predict_is_a_leaf():
    code = ("import sys, sgmft.predict; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric') "
            "or m.startswith(('sgmft.train', 'sgmft.cli', 'sgmft.experiments'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout


# The folders in the order a post travels (docs/design.md, "Package structure"): a module may
# import only modules of its own layer or of layers before it.
LAYERS = [
    ("shared", ("sgmft", "sgmft.config", "sgmft.registry", "sgmft.labels", "sgmft.errors", "sgmft.atomic")),
    ("ingest", ("sgmft.ingest",)),
    ("features", ("sgmft.features",)),
    ("data", ("sgmft.data",)),
    ("models", ("sgmft.models",)),
    ("run folder", ("sgmft.runs", "sgmft.checkpoint", "sgmft.card")),
    ("train", ("sgmft.train",)),
    ("predict", ("sgmft.predict",)),
    ("runner", ("sgmft.runner",)),     # torch-free: imports ingest/ only (docs/backbones.md, Whole-post ONNX)
    ("eval", ("sgmft.eval",)),
    ("experiments", ("sgmft.experiments",)),
    ("serve", ("sgmft.serve",)),
    ("cli", CLI_MODULES),
]


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of LAYERS (add it, and to docs/design.md)"
    return best[0]


def test_imports_only_go_down_the_post_path():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in import_graph().items() for d in deps if _layer(d) > _layer(m)]
    assert upward == []


def test_design_picture_names_every_folder():
    doc = SRC.parents[1] / "docs" / "design.md"
    if not doc.is_file():
        pytest.skip("not a source checkout")
    text = doc.read_text(encoding="utf-8")
    picture = text[text.index("## Package structure"):]
    picture = picture[:picture.index("\n## ", 5)]
    for name, path in _modules().items():
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        shown = f"{rel.parts[0]}/" if len(rel.parts) > 1 else rel.name
        assert shown in picture, f"docs/design.md's structure picture misses {shown} ({name})"
