"""The layering rules, checked on the import graph read from the source (imports inside
functions count too): what a module may pull in, however indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "defect_tune"


def import_graph() -> dict[str, set[str]]:
    """module -> every module it imports (ours as `defect_tune.x`, others by their top name)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = f"defect_tune.{path.stem}"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name if alias.name.startswith("defect_tune.") else alias.name.split(".")[0]
                             for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "defect_tune":
                    found.update(f"defect_tune.{alias.name}" for alias in node.names
                                 if (PACKAGE / f"{alias.name}.py").exists())
                else:
                    found.add(node.module if node.module.startswith("defect_tune.") else node.module.split(".")[0])
        graph[name] = found
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

# module -> what it must never reach, directly or not, even from inside a function
NEVERS = {
    **{f"defect_tune.{m}": {"ray", "optuna"} for m in ("config", "errors", "class_stats", "splits", "readers")},
    **{f"defect_tune.{m}": {"ray", "optuna", "defect_tune.engine", "defect_tune.models", "defect_tune.losses"}
       for m in ("images", "prepare", "synthetic", "data")},
    **{f"defect_tune.{m}": {"ray", "optuna"} for m in ("engine", "models", "losses", "augment", "metrics", "train")},
    **{f"defect_tune.{m}": {"ray", "optuna", "defect_tune.search", "defect_tune.trial"} for m in ("predict", "model_dir")},
}


@pytest.mark.parametrize("module", sorted(NEVERS))
def test_a_module_never_reaches_what_its_layer_forbids(module):
    assert module in GRAPH, f"{module} is gone: update NEVERS"
    # The graph reader sees what it should: the sweep reaches Ray, retrain the sweep.
    assert "ray" in reach(GRAPH, "defect_tune.search") and "defect_tune.search" in reach(GRAPH, "defect_tune.retrain")
    broken = NEVERS[module] & reach(GRAPH, module)
    assert not broken, f"{module} reaches {sorted(broken)}"


@pytest.mark.parametrize("module", ["config", "errors", "class_stats", "splits", "readers", "leaderboard"])
def test_the_core_loads_without_torch(module):
    """What only needs names and figures (the leaderboard, export, Ray's per-trial processes)
    loads no torch or timm when imported; their functions may import it when called."""
    code = f"import sys, defect_tune.{module}; print(sorted({{'torch', 'timm', 'ray'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_nothing_imports_the_command_line_and_the_graph_has_no_cycles():
    importers = sorted(m for m, children in GRAPH.items() if "defect_tune.cli" in children and m != "defect_tune.__main__")
    assert not importers
    cycles = sorted(m for m in GRAPH if m in reach(GRAPH, m))
    assert not cycles, f"modules that reach themselves: {cycles}"
