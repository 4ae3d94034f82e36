"""The house rules, read from the code: which layer may import which, and how big a module may grow.

Layers, top to bottom (docs/ARCHITECTURE.md):
- applications: `cli`, `localmesh`, `profiler`, `bench` — may import anything below;
- services: `planner`, `stage_server`, `coordinator` — import the ground, never each other;
- ground: `pqmesh` (generated stubs in `pqmesh.api`) — imports no package above it.
Every import counts: top-level, inside functions, and module names given to importlib as strings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUND = "pqmesh"
SERVICES = ("planner", "stage_server", "coordinator")
APPLICATIONS = ("cli", "localmesh", "profiler", "bench")
OURS = (GROUND, *SERVICES, *APPLICATIONS)
GENERATED = ROOT / "pqmesh" / "api"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def source_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if GENERATED not in p.parents)


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package of ours, line) for every import in ``path``, and every string passed to
    ``importlib.import_module`` or listed as a dotted module name of ours (e.g. a dispatch table)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _looks_like_module(node.value):
            names = [node.value]
        found.update((name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in OURS)
    return found


def _looks_like_module(text: str) -> bool:
    parts = text.split(".")
    return len(parts) >= 2 and parts[0] in OURS and all(p.isidentifier() for p in parts)


def allowed(importer: str) -> set[str]:
    if importer == GROUND:
        return {GROUND}
    if importer in SERVICES:
        return {GROUND, importer}
    return set(OURS)


@pytest.mark.parametrize("package", [GROUND, *SERVICES, *APPLICATIONS])
def test_imports_point_down_only(package):
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in source_files(package)
        for target, line in sorted(imported_packages(path))
        if target not in allowed(package)
    ]
    assert not wrong, f"{package} may import only {sorted(allowed(package))}:\n" + "\n".join(wrong)


def test_the_rule_sees_upward_imports(tmp_path):
    """The checker itself: an upward import, a function-level one and an importlib string are all found."""
    module = tmp_path / "m.py"
    module.write_text("import planner.search\ndef f():\n    from coordinator import engine\n"
                      "COMMANDS = ('profiler.commands',)\n")
    assert {name for name, _ in imported_packages(module)} == {"planner", "coordinator", "profiler"}


def test_stubs_live_only_in_pqmesh_api():
    stubs = [p.relative_to(ROOT) for p in ROOT.rglob("*_pb2*.py") if ".venv" not in p.parts]
    assert stubs and all(GENERATED in (ROOT / p).parents for p in stubs), stubs


@pytest.mark.parametrize("package", [GROUND, *SERVICES, *APPLICATIONS])
def test_modules_and_functions_stay_small(package):
    too_big = []
    for path in source_files(package):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines "
                                   f"(at most {MAX_FUNCTION_LINES})")
    assert not too_big, "split these:\n" + "\n".join(too_big)
