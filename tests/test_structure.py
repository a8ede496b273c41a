"""The code's shape, checked with `ast` over every .py file under workloads/ and operator/:

* no import cycle among the project's modules (packages `asyncrlhf` and `asyncrlhf_operator`),
  counting imports inside function bodies and under `if TYPE_CHECKING:`, relative imports
  resolved, a package's __init__ a module of its own;
* no file longer than MAX_FILE_LINES lines, no function longer than MAX_FUNCTION_LINES.

Why: a cycle means two modules are one concept split in two (or one concept missing), and
function-level imports only hide it; long files and functions are where concepts pile up. The
first tests check the checker itself on small synthetic trees.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = [REPO / "workloads", REPO / "operator"]
PACKAGES = {"asyncrlhf": REPO / "workloads" / "asyncrlhf",
            "asyncrlhf_operator": REPO / "operator" / "asyncrlhf_operator"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass
class Graph:
    """Modules (dotted name -> file) and import edges (module -> {imported module: line})."""

    files: dict[str, Path]
    edges: dict[str, dict[str, int]] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)  # "file:line: name" of missing modules


def python_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file; `pkg/__init__.py` is the module `pkg` itself."""
    found: dict[str, Path] = {}
    for package, root in packages.items():
        for path in python_files(root):
            parts = (package, *path.relative_to(root).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_init else parts)
            # x/__init__.py next to a leftover x.py (a module being split): Python imports the package
            if name not in found or is_init:
                found[name] = path
    return found


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` names: `from ..api import z` in a.b.c -> a.api."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        raise ValueError(f"relative import beyond the top-level package (line {node.lineno})")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(node: ast.AST, package: str, files: dict[str, Path]) -> list[str]:
    """Project modules an import statement depends on ("?name" when no such module exists);
    imports of other packages are dropped.

    `import a.b` depends on a.b; `from X import n` on X.n when that is a module (`from . import
    x`), else on X, where the name n is defined, even when X is the importer's own package. The
    parent packages Python runs on the way (a, X's parents) are not edges: every submodule import
    runs them, so counting them would make each package that imports a child of its a cycle.
    """
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _resolve_base(node, package)
        wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
    else:
        return []
    tops = {name.split(".")[0] for name in files}
    return [w if w in files else f"?{w}" for w in wanted if w.split(".")[0] in tops]


def _show(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def import_graph(packages: dict[str, Path]) -> Graph:
    graph = Graph(files=module_files(packages))
    for module, path in graph.files.items():
        out = graph.edges.setdefault(module, {})
        package = _package_of(module, path)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            try:
                targets = imported_modules(node, package, graph.files)
            except ValueError as err:
                raise ValueError(f"{_show(path)}: {err}") from None
            for target in targets:
                if target.startswith("?"):
                    graph.unresolved.append(f"{_show(path)}:{node.lineno}: {target[1:]}")
                elif target != module:  # keep the first line that imports it (walk is not in line order)
                    out[target] = min(out.get(target, node.lineno), node.lineno)
    graph.unresolved = sorted(set(graph.unresolved))  # `from x import a, b`: one line, not two
    return graph


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found)


def cycle_through(start: str, members: set[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest import path start -> ... -> start inside one strongly connected component."""
    parents: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(c for c in edges[node] if c in members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return path[::-1] + [start]
            if child not in parents:
                parents[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def cycles_covering(component: list[str], edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Shortest cycles that together pass through every module of the component."""
    cycles: list[list[str]] = []
    for module in component:
        if not any(module in cycle for cycle in cycles):
            cycles.append(cycle_through(module, set(component), edges))
    return cycles


def describe_cycle(path: list[str], graph: Graph) -> str:
    """One line per import on the cycle: where it is and what it imports."""
    return "\n    -> ".join(f"{a} ({_show(graph.files[a])}:{graph.edges[a][b]} imports {b})"
                           for a, b in zip(path, path[1:]))


def long_functions(path: Path, limit: int) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{_show(path)}:{node.lineno}: {node.name}() is {length} lines")
    return found


# ---------------------------------------------------------------------------------------------
# The checker on synthetic trees


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return {"pkg": tmp_path / "pkg"}


def test_relative_imports_resolve_like_python(tmp_path):
    packages = _tree(tmp_path, {
        "pkg/__init__.py": "from .sub import thing\n",
        "pkg/api.py": "import os\nimport pkg.sub.deep\n",
        "pkg/sub/__init__.py": "from . import deep\nfrom .deep import helper\nVALUE = 1\n",
        "pkg/sub/deep.py": "from ..api import z\nfrom . import VALUE\n",
        "pkg/sub/leaf.py": "def f():\n    from .. import api\n    from ..sub.deep import helper\n",
    })
    graph = import_graph(packages)
    assert graph.edges == {
        "pkg": {"pkg.sub": 1},
        "pkg.api": {"pkg.sub.deep": 2},
        "pkg.sub": {"pkg.sub.deep": 1},
        "pkg.sub.deep": {"pkg.api": 1, "pkg.sub": 2},
        "pkg.sub.leaf": {"pkg.api": 2, "pkg.sub.deep": 3},
    }
    # `from . import VALUE` in deep imports its package's __init__, which imports deep; and
    # deep imports api, which imports deep
    assert strongly_connected(graph.edges) == [["pkg.api", "pkg.sub", "pkg.sub.deep"]]
    assert cycles_covering(["pkg.api", "pkg.sub", "pkg.sub.deep"], graph.edges) == [
        ["pkg.api", "pkg.sub.deep", "pkg.api"], ["pkg.sub", "pkg.sub.deep", "pkg.sub"]]
    assert graph.unresolved == [], graph.unresolved


def test_relative_import_beyond_the_top_level_is_an_error(tmp_path):
    packages = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from ... import x\n"})
    with pytest.raises(ValueError, match=r"pkg/a\.py: relative import beyond the top-level package \(line 1\)"):
        import_graph(packages)


def test_cycles_through_function_bodies_are_found_with_their_path(tmp_path):
    packages = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import x\n",
        "pkg/b.py": "def f():\n    from . import c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from .a import y\n",  # into the cycle, not on it
        "pkg/e.py": "from .missing import y\n",
    })
    graph = import_graph(packages)
    assert strongly_connected(graph.edges) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert cycle_through("pkg.a", {"pkg.a", "pkg.b", "pkg.c"}, graph.edges) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert "pkg/b.py:2 imports pkg.c" in describe_cycle(["pkg.a", "pkg.b", "pkg.c", "pkg.a"], graph)
    assert graph.unresolved == [f"{tmp_path / 'pkg' / 'e.py'}:1: pkg.missing"]
    assert "pkg.e" not in {m for targets in graph.edges.values() for m in targets}


# ---------------------------------------------------------------------------------------------
# The project


def test_every_import_of_the_project_names_one_of_its_modules():
    # an import the graph cannot place would silently drop an edge from the cycle check below
    unresolved = import_graph(PACKAGES).unresolved
    assert not unresolved, "imports of project modules that do not exist:\n  " + "\n  ".join(unresolved)


def test_no_import_cycles_among_the_projects_modules():
    graph = import_graph(PACKAGES)
    components = strongly_connected(graph.edges)
    report = [f"{' <-> '.join(c)}:" + "".join(f"\n    {describe_cycle(cycle, graph)}"
                                             for cycle in cycles_covering(c, graph.edges))
              for c in components]
    assert not components, (
        f"{len(components)} import cycle(s); move what both sides need into a module of its own, "
        "or pass it in:\n" + "\n".join(report)
    )


def test_no_file_is_longer_than_the_limit():
    long = [f"{_show(p)}:{n}" for p in (f for d in SCANNED for f in python_files(d))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by concept):\n  " + "\n  ".join(long)


def test_no_function_is_longer_than_the_limit():
    long = [entry for d in SCANNED for f in python_files(d) for entry in long_functions(f, MAX_FUNCTION_LINES)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)
