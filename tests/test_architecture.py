"""The package's import graph (ARCHITECTURE.md): drawn from the source with `ast`, every import counted,
module-level and inside functions alike (a function-level import is still an arrow: it only hides a
circle until the function runs)."""

import ast
import re
import runpy
from pathlib import Path

import sftlens

PACKAGE = Path(sftlens.__file__).resolve().parent
PEERS = ("sftlens.audit", "sftlens.study")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its `__init__.py`)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _owner(name: str, known: dict) -> str | None:
    """The module `name` lives in: itself, or the nearest package or module above it."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the sftlens modules it imports anywhere in its file, as `scripts/import_graph.py` draws it
    (`from a import b` is an arrow to the module `a.b` when there is one, else to `a`; relative imports resolved)."""
    script = runpy.run_path(str(PACKAGE.parent / "scripts" / "import_graph.py"))
    mods, packages = script["sources"](None)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for a, b in script["arrows"](mods, packages):
        graph[a].add(b)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_drawn_from_every_module():
    graph = import_graph()
    assert {"sftlens.cli", "sftlens.audit.run", "sftlens.study.report.page", "sftlens.reporting.page"} <= set(graph)
    assert "sftlens.reporting.bootstrap" in graph["sftlens.audit.repairs"]
    # a function-level import is an arrow too
    assert "sftlens.train" in graph["sftlens.inject"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_audit_and_study_are_peers_that_never_import_each_other():
    graph = import_graph()
    crossing = sorted((a, b) for a, targets in graph.items() for b in targets for x, y in (PEERS, PEERS[::-1])
                      if _under(a, x) and _under(b, y))
    assert crossing == [], crossing


def test_the_shared_floor_imports_neither_peer():
    graph = import_graph()
    upward = sorted((a, b) for a, targets in graph.items() if _under(a, "sftlens.reporting")
                    for b in targets if any(_under(b, peer) for peer in PEERS))
    assert upward == [], upward


def _top_level_names(path: Path) -> set[str]:
    """The names a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_architecture_md_names_only_what_exists():
    """Every file path (`sftlens/...py`, `tests/...py`, `scripts/...py`) and every dotted `sftlens.x.y` the map
    names exists: a module, or a top-level name of the module it is spelled under."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"\b(?:sftlens|tests|scripts)/[\w/]+\.py\b", text))
    assert len(paths) > 50
    missing = sorted(p for p in paths if not (PACKAGE.parent / p).is_file())
    assert missing == [], missing
    known = modules()
    dotted = set(re.findall(r"\bsftlens(?:\.\w+)+", text))
    unknown = []
    for name in sorted(dotted):
        module = _owner(name, known)
        rest = name[len(module) + 1:].split(".")[0] if module and name != module else None
        if module is None or (rest and rest not in _top_level_names(known[module])):
            unknown.append(name)
    assert unknown == [], unknown
