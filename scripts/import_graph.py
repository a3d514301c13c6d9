"""The house in numbers: sftlens' modules ("rooms"), the import arrows between them, their floors, cycles.

    python scripts/import_graph.py [REV]     (default: the working tree; REV: any git revision)

An arrow a -> b: module a imports module b somewhere in its file (`from x import y` points at the module
x.y when there is one); module-level when a top-level statement imports b, else function-level. Floors:
the longest-path layering of the graph, floor(m) = 0 without arrows, else 1 + the highest floor m points
at, so every arrow points down; an arrow that does not (up or sideways) exists only inside a cycle, where
the cycle's modules share one floor (the graph's strongly connected components, condensed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sources(rev: str | None) -> tuple[dict[str, str], set[str]]:
    """(dotted module name -> source, the names that are packages), of the working tree or a git revision."""
    if rev is None:
        files = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in (ROOT / "sftlens").rglob("*.py")}
    else:
        names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "sftlens"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        files = {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=ROOT, check=True, capture_output=True,
                                   text=True).stdout for n in names if n.endswith(".py")}
    out, packages = {}, set()
    for name, text in files.items():
        parts = Path(name).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[dotted] = text
        if parts[-1] == "__init__":
            packages.add(dotted)
    return out, packages


def arrows(mods: dict[str, str], packages: set[str]) -> dict[tuple[str, str], str]:
    """(a, b) -> "module" or "function"."""
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    found: dict[tuple[str, str], str] = {}
    for name, text in mods.items():
        tree = ast.parse(text)
        top = {id(n) for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in ast.walk(stmt)}
        package = name if name in packages else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                b = owner(target) if target.split(".")[0] == "sftlens" else None
                if b and b != name and found.get((name, b)) != "module":
                    found[name, b] = "module" if id(node) in top else "function"
    return found


def components(nodes, edges) -> dict[str, int]:
    """Tarjan: module -> id of its strongly connected component."""
    index, low, stack, on, comp = {}, {}, [], set(), {}
    succ = {n: sorted(b for a, b in edges if a == n) for n in nodes}
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            number = len(set(comp.values()))
            while True:
                w = stack.pop()
                on.discard(w)
                comp[w] = number
                if w == v:
                    break

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return comp


def floors(nodes, edges) -> dict[str, int]:
    comp = components(nodes, edges)
    down = {(comp[a], comp[b]) for a, b in edges if comp[a] != comp[b]}
    memo: dict[int, int] = {}

    def floor(c):
        if c not in memo:
            memo[c] = 1 + max((floor(d) for x, d in down if x == c), default=-1)
        return memo[c]

    return {n: floor(comp[n]) for n in nodes}


def main(rev: str | None) -> None:
    mods, packages = sources(rev)
    found = arrows(mods, packages)
    edges = set(found)
    comp = components(mods, edges)
    level = floors(mods, edges)
    cycles = [sorted(m for m in mods if comp[m] == c) for c in set(comp.values())
              if sum(comp[m] == c for m in mods) > 1]
    up = sorted((a, b) for a, b in edges if level[a] <= level[b])
    print(f"{rev or 'working tree'}: {len(mods)} modules, {len(edges)} arrows "
          f"({sum(k == 'module' for k in found.values())} module-level, "
          f"{sum(k == 'function' for k in found.values())} function-level), "
          f"{max(level.values()) + 1} floors, {len(up)} arrows not pointing down, {len(cycles)} cycles")
    for f in range(max(level.values()) + 1):
        print(f"  floor {f}: {' '.join(sorted(m.removeprefix('sftlens.') for m in mods if level[m] == f))}")
    for cycle in cycles:
        print("  cycle:", " ".join(cycle))
    for a, b in up:
        print(f"  not down: {a} -> {b} ({found[a, b]}-level)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
