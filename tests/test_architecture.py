"""The layering rules, checked on the import graph read from the source (imports inside
functions count too): what a module may pull in, however indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "defect_tune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> every module it imports (ours by their dotted name, others by their top name)."""
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name if alias.name.startswith("defect_tune.") else alias.name.split(".")[0]
                             for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("defect_tune"):
                    # `from defect_tune.raytrain import worker` imports the module defect_tune.raytrain.worker
                    found.update(f"{node.module}.{alias.name}" for alias in node.names
                                 if f"{node.module}.{alias.name}" in modules)
                    found.add(node.module)
                else:
                    found.add(node.module.split(".")[0])
        graph[module_name(path)] = found
    return graph


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


GRAPH = import_graph()


def package(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else ""


def modules_of(*packages: str) -> list[str]:
    return sorted(m for m in GRAPH if package(m) in packages and m.count(".") == 2)


def packages_reached(module: str) -> set[str]:
    return {package(m) for m in reach(GRAPH, module) if m.startswith("defect_tune.") and m.count(".") == 2}


RAY = {"ray", "optuna"}
# package -> what none of its modules may reach, directly or not, even from inside a function
NEVERS = {
    "core": (RAY, {"data", "training", "raytrain", "search", "production", "report"}),
    "data": (RAY, {"training", "raytrain", "search", "production", "report"}),
    "training": (RAY, {"raytrain", "search", "production", "report"}),
    # The Ray Train layer (one TorchTrainer run fed by Ray Data) serves the sweep and retrain alike.
    # It reaches Optuna only through ray_compat, whose Optuna hooks it never calls.
    "raytrain": ({"wandb"}, {"search", "production", "report"}),
    "search": (set(), {"production", "report"}),
    "production": (set(), {"search", "report"}),
    # The report reads a sweep's folder and its space, and redraws the study with Optuna. It reaches
    # Ray only through ray_compat's function-level imports, which it never calls: it loads no Ray
    # (test_light_modules_load_without_torch_or_ray).
    "report": ({"wandb"}, {"raytrain", "production"}),
}


@pytest.mark.parametrize("module", modules_of(*NEVERS))
def test_a_module_never_reaches_what_its_package_forbids(module):
    # The graph reader sees what it should: the sweep reaches Ray, retrain the Ray Train layer's worker.
    assert "ray" in reach(GRAPH, "defect_tune.search.sweep")
    assert "defect_tune.raytrain.worker" in reach(GRAPH, "defect_tune.production.retrain")
    libraries, packages = NEVERS[package(module)]
    broken = sorted(libraries & reach(GRAPH, module)) + sorted(packages & packages_reached(module))
    assert not broken, f"{module} reaches {broken}"


@pytest.mark.parametrize("module", ["defect_tune.production.predict", "defect_tune.production.model_dir"])
def test_prediction_never_reaches_ray_optuna_or_the_sweep(module):
    broken = sorted((RAY | {"wandb"}) & reach(GRAPH, module)) + sorted({"search"} & packages_reached(module))
    assert not broken, f"{module} reaches {broken}"


def test_every_module_but_the_two_front_doors_and_ray_compat_lives_in_a_package():
    """The command line and the Python API (api.py) sit on top; nothing below imports them.
    ray_compat is the one leaf below every package: each private Ray or Optuna name, imported
    inside its functions, so it imports nothing of ours or theirs when loaded."""
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == [
        "__init__.py", "__main__.py", "api.py", "cli.py", "ray_compat.py"]
    assert not sorted(m for m, children in GRAPH.items() if "defect_tune.api" in children)
    assert not {m for m in GRAPH["defect_tune.ray_compat"] if m.startswith("defect_tune")}
    assert {path.parent.name for path in PACKAGE.glob("*/*.py")} == {
        "core", "data", "training", "raytrain", "search", "production", "report"}


def test_every_package_ships_in_the_wheel():
    """pyproject lists the packages by hand (search_spaces installs from outside the tree), so a new
    package left off that list would work in a checkout and be missing from an installed wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert on_disk - listed == set()


def package_graph() -> dict[str, set[str]]:
    """package -> the other packages its modules import (the front doors and ray_compat left out)."""
    graph: dict[str, set[str]] = {}
    for module, children in GRAPH.items():
        if module.count(".") != 2:
            continue
        graph.setdefault(package(module), set()).update(
            package(child) for child in children if child.startswith("defect_tune.") and child.count(".") == 2
            and package(child) != package(module))
    return graph


def test_packages_only_import_down_the_layers_and_have_no_cycle():
    """Module cycles are not enough: search importing production while production imports search
    is a cycle of packages whose modules need not form one. Each package imports only those below
    it: core < data < training < raytrain < search < production < report (production never the
    sweep; the report reads a sweep's folder and space); the front doors sit on top."""
    packages = package_graph()
    cycles = sorted(p for p in packages if p in reach(packages, p))
    assert not cycles, f"packages that reach themselves: {cycles}"
    order = ["core", "data", "training", "raytrain", "search", "production", "report"]
    upward = sorted(f"{p} -> {q}" for p, qs in packages.items() for q in qs if order.index(q) > order.index(p))
    assert not upward, upward
    assert "search" not in packages["production"]  # siblings: retrain shares the Ray Train layer, not the sweep


@pytest.mark.parametrize("module", modules_of("core") + ["defect_tune.data.splits", "defect_tune.data.readers",
                                                         "defect_tune.report.page", "defect_tune.report.study",
                                                         "defect_tune.ray_compat"])
def test_light_modules_load_without_torch_or_ray(module):
    """What only needs names and figures (the leaderboard, export, Ray's per-trial processes)
    loads no torch or timm when imported; their functions may import it when called."""
    code = f"import sys, {module}; print(sorted({{'torch', 'timm', 'ray'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_nothing_imports_the_command_line_and_the_graph_has_no_cycles():
    importers = sorted(m for m, children in GRAPH.items()
                       if "defect_tune.cli" in children and m != "defect_tune.__main__")
    assert not importers
    cycles = sorted(m for m in GRAPH if m in reach(GRAPH, m))
    assert not cycles, f"modules that reach themselves: {cycles}"


def test_private_ray_and_optuna_names_are_used_only_in_ray_compat():
    """When the Ray or Optuna pin moves, defect_tune/ray_compat.py lists everything to check."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "ray_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            private = [m for m in modules
                       if m.split(".")[0] in ("ray", "optuna") and any(p.startswith("_") for p in m.split("."))]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in ("ray", "optuna", "distribution"):
                    private.append(f"{node.value.id}.{node.attr}")
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {m}" for m in private]
    assert not found, found
