"""The package's layering (docs/design.md, "Layers"): imports between its subpackages and
top-level modules go one way only, so no package imports one that imports it back."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "vhostuser"


def _unit(rel: Path) -> str:
    """The subpackage (or top-level module) a file belongs to."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imports() -> dict[str, set[tuple[str, str]]]:
    """unit -> {(imported unit, the importing file)}, from every import of the package:
    relative ones, `from vhostuser... import`, `import vhostuser...` (TYPE_CHECKING-only
    ones included: mypy follows them)."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        unit = _unit(rel)
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[list[str]] = []
            if isinstance(node, ast.Import):
                targets = [a.name.split(".")[1:] for a in node.names
                           if a.name.startswith("vhostuser.")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = list(rel.parent.parts)[: len(rel.parent.parts) - (node.level - 1)]
                elif node.module == "vhostuser" or (node.module or "").startswith("vhostuser."):
                    base = []
                else:
                    continue
                module = (node.module or "").split(".")
                if not node.level:
                    module = module[1:]  # past "vhostuser"
                if module and module[0]:
                    targets = [base + module]
                else:  # `from . import a, b`: each name is a module
                    targets = [[*base, a.name] for a in node.names]
            for target in targets:
                if target and target[0] != unit:
                    edges[unit].add((target[0], str(rel)))
    return edges


def test_no_package_imports_one_that_imports_it_back() -> None:
    edges = imports()
    assert {"engine", "virtq", "transport", "frontend", "devices"} <= set(edges)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt, _ in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(f"{a} -> {b} ({where})" for a in edges for b, where in edges[a]
                    if a in reach(b))
    assert cycles == []


def test_the_bottom_layers_import_nothing_above_them() -> None:
    edges = imports()
    above = {"engine", "transport", "frontend", "devices", "appliance", "vvu", "vfio_user",
             "switch", "bridge", "check", "cli", "trace", "fuse"}
    for low in ("protocol", "virtq", "memory", "framer", "sockets", "unix_channel", "fileio"):
        assert not {b for b, _ in edges.get(low, ())} & above, low
