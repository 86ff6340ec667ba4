"""Layers point one way: the import graph of the ``ci`` package, read from
each module's source (function-local imports included, since hiding an
import inside a function hides a cycle, not removes it), has no cycle, and
the low layers import no daemon or tool."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

CI = Path(__file__).resolve().parents[1] / "ci"

# Modules that only start or talk to daemons: nothing below them may import them.
DAEMONS = {"dispatcher", "runner", "observer", "cli", "up", "console", "web", "__main__"}
# The bottom layers: plain rules, values and helpers. Each may import only the
# ci modules listed (the stdlib and third-party packages do not count).
LEAVES = {
    "patterns": set(),
    "limits": set(),
    "text": set(),
    "files": set(),
    "aio": set(),
    "models": set(),
    "protocol": {"patterns"},
    "config": {"limits"},
    "tls": set(),
    "local": set(),
    "conditions": set(),
    "masking": set(),
}


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: what runs only when the module is the program."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def _nodes(tree: ast.AST):
    """Every node, except inside a ``__main__`` guard (`python -m ci.runner` handing over to the
    cli is how the program starts, not something importing the module pulls in)."""
    for child in ast.iter_child_nodes(tree):
        if not _is_main_guard(child):
            yield child
            yield from _nodes(child)


def imports_of(path: Path, depth: int = 1) -> set[str]:
    """The ci modules ``path`` imports, anywhere in it (but its ``__main__`` guard).
    ``depth`` 2 is a module of a subpackage (ci/web/): ``..x`` is a ci module there,
    and its imports of its own package's modules are not counted."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in _nodes(tree):
        if isinstance(node, ast.ImportFrom) and depth == 2:
            if node.level == 2:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.level == 0 and node.module and node.module.split(".")[0] == "ci":
                rest = node.module.split(".")[1:]
                found.update(rest[:1] or [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:             # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:                           # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "ci":
                rest = node.module.split(".")[1:]
                found.update(rest[:1] or [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ci" and len(parts) > 1:
                    found.add(parts[1])
    return found


@functools.lru_cache(maxsize=None)
def graph() -> dict[str, set[str]]:
    """ci modules, and each subpackage (ci/web) as one node, with the ci modules each imports."""
    modules = {path.stem: path for path in CI.glob("*.py") if path.stem != "__init__"}
    packages = {path.parent.name: path.parent for path in CI.glob("*/__init__.py")}
    names = modules.keys() | packages.keys()
    edges = {name: imports_of(path) & names - {name} for name, path in modules.items()}
    for name, folder in packages.items():
        parts = [p for p in folder.glob("*.py") if p.stem != "__main__"]      # the entry point, like a main guard
        edges[name] = set().union(*(imports_of(p, depth=2) for p in parts)) & names - {name}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}          # "open" while on the stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        stack = stack + [node]
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack)
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start, [])
            if found:
                return found
    return None


def test_the_reader_sees_function_local_imports():
    edges = graph()
    assert "console" in edges["cli"]        # `from . import console as live`, inside a function
    assert "up" in edges["cli"]
    assert "cli" not in edges["observer"]   # only in its `if __name__ == "__main__":`
    assert {"net", "protocol", "settings"} <= edges["web"]   # ci/web/*.py, `from .. import net, protocol`


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()) or [])


def test_leaves_import_only_what_they_may():
    edges = graph()
    for leaf, allowed in LEAVES.items():
        assert edges[leaf] <= allowed, f"ci/{leaf}.py imports {sorted(edges[leaf] - allowed)}"


def test_nothing_low_level_imports_a_daemon_or_tool():
    edges = graph()
    low = set(LEAVES) | {"settings", "net", "gitops", "daemon", "gitwatch", "buildfile", "tui",
                         "console_state", "scheduler", "store"}
    for module in sorted(low & edges.keys()):
        assert not edges[module] & DAEMONS, f"ci/{module}.py imports {sorted(edges[module] & DAEMONS)}"
