"""The package's shape, checked from source with ``ast`` (see DEVELOPERS.md, "Package layout").

Every ghostify module is parsed, imports inside functions included, and the checks are:
no import cycle among ghostify's modules, no import of another module's ``_private`` name,
no module over 400 lines, no function over 60 lines of code (its docstring not counted: documentation is
not complexity) unless its docstring says why ("Long because ..."), and nothing imports ``ghostify.cli``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ghostify"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_REASON = "Long because"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of ``module``, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                # ``from . import calib`` imports a module; ``from .x import name`` a name of x
                out.append((sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m == "ghostify" or m.startswith("ghostify.")]


def graph() -> dict[str, set[str]]:
    """Module -> the ghostify modules it imports. Importing ``a.b.c`` also runs ``a.b``'s ``__init__``,
    but a package's own ``__init__`` importing its children is not an edge back from the children."""
    edges = {}
    for m in MODULES:
        targets = set()
        for target, _, _ in imports(m):
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != m and target != "ghostify":  # ghostify/__init__ only holds lazy re-exports
                targets.add(target)
        edges[m] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_checker_sees_function_level_imports():
    # calib is registered lazily by ghostify.init; the function-level import must still be seen
    assert any(t.startswith("ghostify.init.calib") for t, _, _ in imports("ghostify.init"))


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def unit(module: str) -> str:
    """The top-level unit a module belongs to: ``ghostify.conversion.plan`` -> ``ghostify.conversion``."""
    return ".".join(module.split(".")[:2])


def test_no_cycle_between_subpackages():
    """The stages form layers: collapsed to subpackages and top-level modules, the graph is still acyclic."""
    units: dict[str, set[str]] = {}
    for m, targets in graph().items():
        units.setdefault(unit(m), set()).update(unit(t) for t in targets if unit(t) != unit(m))
    assert find_cycle(units) is None


# DEVELOPERS.md, "What may import what": top to bottom; a unit imports only units below it.
LAYERS = ["cli", "train", "tradeoffs", "deploy", "measure", "zoo", "serialization", "arch", "conversion", "config",
          "init", "augment", "graph", "layers", "outputs", "_util", "trust", "ratio", "errors"]
OUTSIDE = {"ghostify", "ghostify.__main__", "ghostify.demo", "ghostify.reference"}  # entry points and the shim


def test_imports_point_down_the_layers():
    rank = {f"ghostify.{name}": i for i, name in enumerate(LAYERS)}
    up = [f"{m} -> {t}" for m, targets in graph().items() if unit(m) not in OUTSIDE for t in targets
          if unit(t) != unit(m) and rank[unit(t)] <= rank[unit(m)]]
    assert up == []


def test_every_unit_has_a_layer():
    assert {unit(m) for m in MODULES} - OUTSIDE <= {f"ghostify.{name}" for name in LAYERS}


def test_no_private_names_across_modules():
    bad = [f"{m}:{line} imports {name} from {target}" for m in MODULES for target, name, line in imports(m)
           if name and name.startswith("_") and not name.startswith("__") and target != m]
    assert bad == []


def test_nothing_imports_the_cli():
    bad = [m for m, targets in graph().items() if not m.startswith("ghostify.cli") and m != "ghostify.__main__"
           and any(t == "ghostify.cli" or t.startswith("ghostify.cli.") for t in targets)]
    assert bad == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module} has {lines} lines; split it by job"


def code_lines(node: ast.FunctionDef) -> int:
    """The lines of a function from its signature on (decorators, e.g. click options, not counted) less its docstring."""
    length = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        length -= first.end_lineno - first.lineno + 1
    return length


def test_the_checker_counts_code_not_docstrings():
    fn = ast.parse('def f():\n    """Doc.\n\n    More.\n    """\n    return 1\n').body[0]
    assert code_lines(fn) == 2


def test_function_size():
    long = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = code_lines(node)
                if length > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    long.append(f"{m}.{node.name} ({length} lines)")
    assert long == []
