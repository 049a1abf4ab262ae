"""The package layout is the data flow: no module imports from a stage that comes after its own."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mc_gguf"

# README "How the code is laid out": each part may import the ones before it (and the shared
# errors, atomic, device, ray_cluster and _lazy modules), never one after it.
ORDER = ["runtime", "ggml", "hf", "gguf_io", "calibrate", "prune", "loader", "allocate", "quantize", "evaluate",
         "settings", "pipeline", "demo", "cli", "__main__"]
SHARED = {"errors", "atomic", "artifact", "device", "ray_cluster", "_lazy", "__init__", ""}


def part_of(module: str) -> str:
    """``mc_gguf.calibrate.moe`` -> ``calibrate``; ``mc_gguf`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path) -> set[str]:
    """Every mc_gguf module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mc_gguf")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mc_gguf"):
            found |= {f"{node.module}.{alias.name}" if node.module == "mc_gguf" else node.module
                      for alias in node.names}
    return found


def test_no_module_imports_a_later_stage():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        own = part_of(".".join(rel.parts))
        if own in SHARED:
            continue  # the package's own facade (mc_gguf.load) and the shared helpers
        for module in imported_modules(path):
            other = part_of(module)
            if other in SHARED or other == "__version__":
                continue
            if ORDER.index(other) > ORDER.index(own):
                wrong.append(f"{rel} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_every_part_of_the_package_is_in_the_order():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py")}
    assert parts - SHARED == set(ORDER)


def test_no_import_cycles_between_modules():
    """Within a part as across parts, no module imports (at the top or inside a function) one that imports it
    back, directly or through others."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    edges = {name: {m for m in imported_modules(path) if m in modules and m != name and
                    not (m == "mc_gguf" or name == "mc_gguf")} for name, path in modules.items()}
    # the lazy facades (__init__ of each part) import nothing at import time but names; leave them out
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    edges = {name: targets - packages for name, targets in edges.items() if name not in packages}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
