"""The code passes ruff with the rules in pyproject.toml ([tool.ruff]), in every test run and so
in CI: syntax errors, undefined names, unused imports and variables, import order, modern syntax."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "defect_tune", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
