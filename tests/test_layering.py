"""The package's layering (docs/architecture.md, "Layers"): each folder imports only from the
folders below it, and no module imports itself back through others.

Every import counts, function-level ones included: an import placed inside a function to dodge
a cycle is still an edge of the architecture (two cycles survived that way before the re-layer).
The walk is static (`ast`), so it costs no import of torch.
"""
from __future__ import annotations

import ast
from pathlib import Path

from support.common import ROOT

PACKAGE = Path(ROOT) / "ulysses_train"
# Top to bottom. A module may import from its own folder and from any folder below its own.
LAYERS = ["cli", "plan", "train", "evaluate", "hf", "checkpoint", "parallel", "data", "model",
          "config", "utils"]
# The leaves import nothing of the package outside themselves.
LEAVES = {"config", "utils"}
# Entry-point shims are the cli layer wherever they sit (they only call cli/).
ENTRY_POINTS = {"ulysses_train.export": "cli", "ulysses_train.plan.__main__": "cli"}


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package modules it imports}, function-level imports included. A `from X
    import name` where X.name is a module counts as an import of X.name."""
    paths = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def layer_of(module: str) -> str | None:
    """The folder (layer) of `module`; None for the package root."""
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if mine is None or theirs is None or mine == theirs:
                continue
            if mine in LEAVES or LAYERS.index(theirs) < LAYERS.index(mine):
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == set(LAYERS)


def test_no_import_runs_up_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_what_they_target(tmp_path):
    """The walk sees a function-level import up the layers and a two-module cycle."""
    pkg = tmp_path / "ulysses_train"
    for folder in ("model", "train"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "model" / "gpt.py").write_text("def f():\n    from ..train import trainer\n")
    (pkg / "train" / "trainer.py").write_text("from ..model import gpt\n")
    graph = import_graph(pkg)
    assert graph["ulysses_train.model.gpt"] == {"ulysses_train.train.trainer"}
    assert upward_imports(graph) == ["ulysses_train.model.gpt (model) imports "
                                     "ulysses_train.train.trainer (train)"]
    assert cycles(graph) == [["ulysses_train.model.gpt", "ulysses_train.train.trainer"]]
