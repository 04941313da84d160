"""The architecture's import rules, checked on the source tree (socket-free, milliseconds).

- `common` imports nothing of ours; `broker` imports only `common`; `nodes` may import both.
- push and pull never import each other; nothing but the CLI itself imports the CLI.
- No import cycle between our modules (lazy imports inside functions count too).
- The socket-free protocol classes import no zmq, threading, clock or OS I/O.
"""

import ast
from pathlib import Path

import pytest

from tests.procs import REPO

PACKAGES = {"broker": "fedstream.broker", "nodes": "fedstream.nodes", "common": "fedstream.common"}

# Modules that hold protocol decisions only (the h11 style): no sockets, threads, clocks or files.
SOCKET_FREE = [
    "fedstream.broker.registry",
    "fedstream.broker.outflow",
    "fedstream.common.safejson",
    "fedstream.common.peerlog",
    "fedstream.nodes.push.window",
    "fedstream.nodes.push.assembly",
    "fedstream.nodes.pull.window",
    "fedstream.nodes.pull.budget",
]
FORBIDDEN_IN_SOCKET_FREE = {"zmq", "threading", "time", "os", "socket", "select", "subprocess", "asyncio",
                            "concurrent", "shutil"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module name `path` imports, anywhere in the file, resolved to absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from pkg import mod` imports a submodule when pkg.mod is one of ours.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for folder in PACKAGES for p in (REPO / folder).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return edges


def _third_party(module: str) -> set[str]:
    path = next(p for p in (REPO / folder for folder in PACKAGES) for p in p.rglob("*.py")
                if _module_name(p) == module)
    return {m.split(".")[0] for m in _imports(path, module)}


def test_the_tree_is_found(graph):
    assert "fedstream.nodes.cell" in graph
    assert "fedstream.broker.broker" in graph
    assert "fedstream.common.protocol" in graph


def test_dependency_direction(graph):
    for module, deps in graph.items():
        for dep in deps:
            if module.startswith("fedstream.common"):
                assert not dep.startswith(("fedstream.nodes", "fedstream.broker")), (module, dep)
            if module.startswith("fedstream.broker"):
                assert not dep.startswith("fedstream.nodes"), (module, dep)


def test_push_and_pull_stay_apart(graph):
    for module, deps in graph.items():
        for dep in deps:
            if module.startswith("fedstream.nodes.push"):
                assert not dep.startswith("fedstream.nodes.pull"), (module, dep)
            if module.startswith("fedstream.nodes.pull"):
                assert not dep.startswith("fedstream.nodes.push"), (module, dep)


def test_nothing_imports_the_cli(graph):
    for module, deps in graph.items():
        if not module.startswith("fedstream.nodes.cli") and module != "fedstream.nodes.__main__":
            assert not any(d.startswith("fedstream.nodes.cli") for d in deps), module


def test_cli_commands_never_import_the_group(graph):
    for module, deps in graph.items():
        if module.startswith("fedstream.nodes.cli."):
            assert "fedstream.nodes.cli" not in deps, module


def test_no_import_cycle(graph):
    # A package imports its children; a child importing its own package (`from pkg import x`)
    # is how Python resolves `pkg.x`, so that edge alone is not a cycle.
    def deps_of(module: str) -> set[str]:
        return {d for d in graph[module] if not module.startswith(d + ".")}

    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(deps_of(module)):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", SOCKET_FREE)
def test_protocol_state_is_socket_free(module):
    assert not (_third_party(module) & FORBIDDEN_IN_SOCKET_FREE), module
