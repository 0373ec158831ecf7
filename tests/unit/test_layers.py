"""The house rules of the package layout: no import cycles, recipes on top, pure parts without Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import raykd

ROOT = Path(raykd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the raykd modules it imports anywhere in its body (lazy imports included)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_modules():
    """Lazy (function-level) imports count too: a cycle hidden in a function is still a cycle."""
    graph = _imports()
    # a package's __init__ re-exporting its own submodules is not a cycle of ideas
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and d == _package(m))} for m, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_lower_layers_never_import_recipes():
    bad = {m: sorted(d for d in deps if d.startswith("raykd.recipes")) for m, deps in _imports().items()
           if not m.startswith("raykd.recipes") and m not in ("raykd.cli",)}
    assert not {m: d for m, d in bad.items() if d}


def test_pure_parts_import_neither_ray_nor_serve():
    """Losses, the cache schema and the configs are importable without Ray (module level)."""
    for rel in ("losses", "soft_labels/schema.py", "soft_labels/cache.py", "config.py", "methods", "train/step.py",
                "train/local.py"):
        for path in (ROOT / rel).rglob("*.py") if (ROOT / rel).is_dir() else [ROOT / rel]:
            top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
            names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
            assert not [n for n in names if n.split(".")[0] == "ray"], path
