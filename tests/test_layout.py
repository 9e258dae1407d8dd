"""The package's shape, checked from its source: no import cycles (module-level or deferred into a function),
no module importing another's private names, and a planner that needs nothing with torch in it."""

from __future__ import annotations

import ast
from pathlib import Path

import heavylift

PACKAGE = Path(heavylift.__file__).parent
PURE = ("heavylift.planner", "heavylift.model", "heavylift.hardware", "heavylift.schemes", "heavylift.defaults",
        "heavylift.errors")
TORCH_SIDE = ("torch", "transformers", "bitsandbytes", "torchao", "accelerate", "triton", "heavylift.runtime",
              "heavylift.engine", "heavylift.report", "heavylift.commands", "heavylift.cli", "heavylift.api")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) for every import in the file, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, tuple(alias.name for alias in node.names)))
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _edges() -> dict[str, set[str]]:
    """Module -> the heavylift modules it imports ("from pkg import mod" counts as importing pkg.mod)."""
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for module, names in _imports(path):
            for candidate in [f"{module}.{n}" for n in names] + [module]:
                if candidate in MODULES and candidate != name:
                    targets.add(candidate)
                    break
        edges[name] = targets
    return edges


def test_no_import_cycles():
    edges, state, cycles = _edges(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    reached = [f"{name}: {module}.{n}" for name, path in MODULES.items() for module, names in _imports(path)
               for n in names if n.startswith("_") and not n.startswith("__") and module.startswith("heavylift")]
    assert not reached


def test_the_pure_side_imports_nothing_from_the_torch_side():
    edges = _edges()

    def reach(name, seen):
        for module, _ in _imports(MODULES[name]):
            if module.startswith(TORCH_SIDE) and not module.startswith(PURE):
                yield f"{name} imports {module}"
        for nxt in edges[name] - seen:
            seen.add(nxt)
            yield from reach(nxt, seen)

    pure = [name for name in MODULES if name.startswith(PURE)]
    assert not [line for name in pure for line in reach(name, {name})]
