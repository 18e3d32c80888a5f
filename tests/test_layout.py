"""The package's import structure (docs/design.md §1): no import circles, ``lads.util`` a leaf,
and nothing but ``lads.cli`` importing a command. Read from the source with ``ast``: module-level
imports and the imports inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lads"

# The front doors on LADS (``LADS.from_pretrained``, ``LADS.predict`` …) call into modules that
# import ``lads.models.lads`` themselves; they import them when called, and are the only
# circle allowed.
FRONT_DOORS = {("lads.models.lads", f"LADS.{name}") for name in
               ("from_pretrained", "save_pretrained", "push_to_hub", "predict", "predict_many", "prepare",
                "extract_subnet")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, list[tuple[str, str | None]]]:
    """For each module of lads: ``(imported lads module, enclosing function or None)``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = {}
    for name, path in modules.items():
        edges, todo = [], [(ast.parse(path.read_text()), "")]
        while todo:  # (node, the qualified name of the function or class it is in)
            node, where = todo.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    todo.append((child, f"{where}.{child.name}" if where else child.name))
                    continue
                targets = []
                if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("lads"):
                    targets = [resolve(f"{child.module}.{a.name}") for a in child.names]
                elif isinstance(child, ast.Import):
                    targets = [resolve(a.name) for a in child.names if a.name.startswith("lads")]
                edges += [(target, where or None) for target in targets if target and target != name]
                todo.append((child, where))
        found[name] = edges
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_parser_sees_both_kinds_of_import():
    found = imports()
    assert ("lads.models.lads", None) in found["lads.models.pretrained"]  # at module level
    assert ("lads.models.pretrained", "LADS.from_pretrained") in found["lads.models.lads"]  # in a method


def test_no_import_circles_but_through_the_front_doors_of_LADS():
    graph = {m: {t for t, where in edges if (m, where) not in FRONT_DOORS} for m, edges in imports().items()}
    assert cycles(graph) == []


def test_front_doors_are_the_only_circle():
    """Counting the front doors, the one circle is LADS and the modules they open."""
    graph = {m: {t for t, _ in edges} for m, edges in imports().items()}
    for component in cycles(graph):
        assert "lads.models.lads" in component


def test_util_is_a_leaf():
    for module, edges in imports().items():
        if module.startswith("lads.util"):
            outside = {t for t, _ in edges if not t.startswith("lads.util") and t != "lads.errors"}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_only_the_cli_imports_a_command():
    for module, edges in imports().items():
        if not module.startswith("lads.commands") and module != "lads.cli":
            commands = {t for t, _ in edges if t.startswith("lads.commands")}
            assert not commands, f"{module} imports {sorted(commands)}"
