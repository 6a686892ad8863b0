"""The import graph of `erw` is a DAG, and `erw` knows nothing about Kubeflow.

Every `import` counts, also those inside functions (they run too, only later). Command modules
(`erw/cli.py` and `*/commands.py`) are the command-line layer: they may reach any package, and
no library module imports them. `erw.cli` finds the command areas by module name, so the
`pipeline` package plugs its own commands in without `erw` importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("pipeline", "components", "kfp")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, name: str | None = None) -> set[str]:
    """Absolute names of every module (or module attribute) that `path` (module `name`) imports."""
    name, out = name or module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def erw_graph() -> dict[str, set[str]]:
    """Module -> the erw modules it imports. A module's own parent packages are left out: Python
    runs them before the module anyway, so `from erw.launch import kube` inside erw.launch.run
    depends on kube, not on its own package."""
    modules = {module_name(p): p for p in (REPO / "erw").rglob("*.py")}
    return {
        name: {
            target
            for target in imported_names(path)
            if target in modules and target != name and not name.startswith(target + ".")
        }
        for name, path in modules.items()
    }


def is_command_layer(name: str) -> bool:
    return name == "erw.cli" or name.endswith(".commands")


def package(name: str) -> str:
    """erw.data.loader -> erw.data; top-level modules (erw.config) are their own unit."""
    return ".".join(name.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def edges_within(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a in component for b in graph.get(a, ()) if b in component)


def test_no_import_cycle_between_erw_modules():
    graph = erw_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(", ".join(edges_within(c, graph)) for c in found)


def test_erw_packages_import_in_one_direction():
    graph = erw_graph()
    packages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        if is_command_layer(name):
            continue
        packages.setdefault(package(name), set()).update(package(t) for t in targets if package(t) != package(name))
    found = cycles(packages)
    detail = [
        f"{a} -> {b}"
        for c in found
        for a, targets in graph.items()
        if not is_command_layer(a)
        for b in targets
        if package(a) in c and package(b) in c and package(a) != package(b)
    ]
    assert not found, "package cycles through: " + "; ".join(sorted(detail))


def test_library_modules_never_import_the_command_layer():
    graph = erw_graph()
    upward = [
        f"{a} -> {b}" for a, targets in graph.items() if not is_command_layer(a) for b in targets if is_command_layer(b)
    ]
    assert not upward, upward


def test_erw_never_imports_kubeflow_code():
    leaks = [
        f"{module_name(path)} imports {target}"
        for path in (REPO / "erw").rglob("*.py")
        for target in imported_names(path)
        if target.split(".")[0] in FORBIDDEN
    ]
    assert not leaks, leaks


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from pipeline import dag\n    from . import config\n")
    assert {"pipeline", "pipeline.dag", "erw", "erw.config"} <= imported_names(module, "erw.probe")


def test_no_module_edits_the_import_path():
    """bench/ and tests/ are packages (`python -m bench.X`, `tests.chaos.harness`): nothing puts a
    folder on sys.path to find its neighbours. A test's subprocess script may (it is not a module)."""
    edits = []
    for path in [
        *REPO.glob("erw/**/*.py"),
        *REPO.glob("bench/*.py"),
        *REPO.glob("tests/**/*.py"),
        *REPO.glob("components/*.py"),
        *REPO.glob("pipeline/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not edits, "sys.path used in: " + ", ".join(edits)
