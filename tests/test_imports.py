"""No import cycle anywhere in tunefix: module-level imports and the ones inside functions.

A cycle hidden inside functions still means two modules that cannot be read (or changed)
one without the other; the model files, the doctor and loading had one (issue 17).
"""

from __future__ import annotations

import ast
from pathlib import Path

import tunefix

PACKAGE = Path(tunefix.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an import name loads (``tunefix.x.f`` -> ``tunefix.x`` when f is a name in it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = _resolve(name, modules) if name.startswith("tunefix.") or name == "tunefix" else None
                # Importing tunefix.a.b runs tunefix/a/__init__.py first (the root package is
                # stdlib-light by test_import_is_light, and every module imports it).
                while target and target != "tunefix":
                    if target != module and not module.startswith(target + "."):
                        graph[module].add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_in_tunefix():
    graph = import_graph()
    assert len(graph) > 60 and graph["tunefix.model.load"], "the walk found too little"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    graph["tunefix.model.files"].add("tunefix.doctor.subject")  # the cycle issue 17 removed
    assert ["tunefix.doctor.subject", "tunefix.model.files"] in cycles(graph)


def test_model_files_import_neither_the_doctor_nor_loading():
    assert not {m for m in import_graph()["tunefix.model.files"] if m.startswith(("tunefix.doctor", "tunefix.model.load"))}
