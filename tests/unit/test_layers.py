"""The house rules of the package layout: packages in one order, no import cycles, pure parts
without Ray.

The order (README, "Layout"): a module imports only its own package and packages to its left.
Every import counts: module level, inside functions, and a package's ``__init__``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import raykd

ROOT = Path(raykd.__file__).parent

LAYERS = (
    ("raykd", "config", "storage", "console", "report", "registry"),  # report, registry: import no raykd module
    ("cluster", "watchdog", "data", "losses", "models"),
    ("students",),  # before teacher: a trained (e.g. sparsified) student is served as a teacher
    ("teacher",),
    ("soft_labels",),
    ("train",),
    ("methods",),
    ("recipes",),
    ("cli",),
)
"""Left to right; the top-level modules (``config.py``, ``report.py``, ...) are packages of their own."""

EXEMPT: set[tuple[str, str]] = set()
"""Temporary: edges against the order still allowed, each with the issue that removes it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _targets(node: ast.AST) -> list[str]:
    """The raykd modules an import statement loads (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0):
        return []
    out = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
    return [t for t in dict.fromkeys(out) if t in MODULES]


@functools.cache
def _imports() -> dict[str, set[str]]:
    """Module -> the raykd modules it imports anywhere in its body (function-level imports included)."""
    return {name: {t for node in ast.walk(ast.parse(path.read_text())) for t in _targets(node) if t != name}
            for name, path in MODULES.items()}


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
    """``raykd.soft_labels.cache`` -> ``soft_labels``; ``raykd.config`` -> ``config``; ``raykd`` -> ``raykd``."""
    return module.split(".")[1] if "." in module else module


def _rank(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if _package(module) in layer)


def test_every_package_has_a_layer():
    assert not {_package(m) for m in MODULES} - {p for layer in LAYERS for p in layer}


def test_imports_follow_the_layer_order():
    """Each import goes to the module's own package or to a layer strictly to its left."""
    against = sorted(f"{m} -> {d}" for m, deps in _imports().items() for d in deps
                     if _package(d) != _package(m) and _rank(d) >= _rank(m) and (m, d) not in EXEMPT)
    assert not against, "imports against the layer order:\n" + "\n".join(against)


def test_exemptions_are_still_needed():
    graph = _imports()
    assert not [e for e in EXEMPT if e[1] not in graph[e[0]]], "an exempt edge is gone: delete it from EXEMPT"


def test_no_import_cycles_between_modules():
    """Function-level imports and ``__init__`` edges count too: a cycle hidden in a function is still a cycle."""
    graph = _imports()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_pure_parts_import_neither_ray_nor_serve():
    """Losses, the cache schema and the configs are importable without Ray (module level)."""
    for rel in ("losses", "soft_labels/schema.py", "soft_labels/cache.py", "config", "methods", "train/step.py",
                "train/local.py"):
        for path in (ROOT / rel).rglob("*.py") if (ROOT / rel).is_dir() else [ROOT / rel]:
            top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
            names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
            assert not [n for n in names if n.split(".")[0] == "ray"], path


def test_function_level_imports_say_why():
    """A raykd import inside a function keeps a heavy library out of import time (or breaks a stated
    loop); its function says which in a ``# lazy: ...`` (or ``# loop: ...``) comment."""
    quiet = []
    for name, path in MODULES.items():
        source = path.read_text()
        lines = source.split("\n")
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            own = [n for n in ast.walk(fn) if _targets(n) and _enclosing(fn, n)]
            text = "\n".join(lines[fn.lineno - 1:fn.end_lineno])
            if own and "# lazy:" not in text and "# loop:" not in text:
                quiet.append(f"{name}.{fn.name}")
    assert not quiet, "function-level raykd imports without a reason: " + ", ".join(sorted(quiet))


def _enclosing(fn: ast.AST, node: ast.AST) -> bool:
    """True when ``node`` belongs to ``fn`` itself, not to a function nested in it."""
    inner = [f for f in ast.walk(fn) if f is not fn and isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return not any(node in set(ast.walk(f)) for f in inner)


MAX_FUNCTION_LINES = 60
"""Issue 25: no function in ``raykd/`` over this many lines (signature and docstring included)."""


def test_no_function_over_sixty_lines():
    """A long function is split into named steps; the limit counts every line from ``def`` to its end."""
    long = []
    for name, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES:
                long.append(f"{name}.{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(sorted(long))
