"""The package's shape: dependencies point one way, no circle, no import hidden in a function.

Layers, lowest first; a module may import its own layer and those below, never above:

0. foundation: config, paths, seeding, runtime, artefacts
1. data and models: data, images, figures, clip, sampling, families, train
2. engine: noise, outputs, gradients, hooks, projection, store, featurize, farm, ray_executor
3. math: scoring, streaming, lds, lambdas
4. methods
5. stages
6. report and CLI: report, pipeline, cli

``python tests/test_architecture.py`` prints the import graph (who imports whom).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dtrak"

LAYERS = [
    {"config", "paths", "seeding", "runtime", "artefacts"},
    {"data", "images", "figures", "clip", "sampling", "families", "train"},
    {"noise", "outputs", "gradients", "hooks", "projection", "store", "featurize", "farm",
     "ray_executor"},
    {"scoring", "streaming", "lds", "lambdas"},
    {"methods"},
    {"stages"},
    {"report", "pipeline", "cli", "__init__"},
]


def modules() -> dict[str, Path]:
    """``dtrak.x.y`` -> file, for every module of the package."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name in one) falls under."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.AST, module: str, path: Path, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level == 0:
            base = node.module or ""
        else:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        names = [f"{base}.{a.name}" for a in node.names]  # a module, or a name in ``base``
    else:
        return []
    found = [_resolve(n, mods) for n in names if n == "dtrak" or n.startswith("dtrak.")]
    return [f for f in found if f and f != module]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> modules it imports at module level, imports found inside functions)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    hidden = []
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            graph[module].update(_targets(node, module, path, mods))
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    for target in _targets(node, module, path, mods):
                        hidden.append((module, node.lineno, target))
    return graph, hidden


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} is in no layer; add it to LAYERS")


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_hidden_in_a_function():
    _, hidden = import_graph()
    assert not hidden, f"imports of dtrak modules inside functions: {hidden}"


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph()
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"


def test_dependencies_point_one_way():
    graph, _ = import_graph()
    upward = [(m, n) for m, deps in graph.items() for n in deps
              if layer(n) > layer(m) and not n.startswith(m + ".")]
    assert not upward, f"imports of a higher layer: {upward}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The graph tools on a hand-made circle and layering (so the tests above can fail)."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert layer("dtrak.config") == 0 and layer("dtrak.stages.lds") == 5
    assert layer("dtrak.methods.pool") == 4 and layer("dtrak.families.unet2d") == 1
    mods = {"dtrak.a": tmp_path / "a.py", "dtrak.b": tmp_path / "b.py"}
    fn = ast.parse("def f():\n    from . import b\n").body[0]
    assert _targets(fn.body[0], "dtrak.a", mods["dtrak.a"], mods) == ["dtrak.b"]


if __name__ == "__main__":
    graph, _ = import_graph()
    for module in sorted(graph, key=lambda m: (layer(m), m)):
        deps = ", ".join(sorted(d.removeprefix("dtrak.") for d in graph[module])) or "-"
        print(f"[{layer(module)}] {module.removeprefix('dtrak.') or 'dtrak'} <- {deps}",
              file=sys.stdout)
