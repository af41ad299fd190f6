"""Files from elsewhere never run code here: checkpoints load weights only, YAML loads safely."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from defect_tune.core.config import ConfigError, load_config
from defect_tune.training.models import build_model
from defect_tune.training.train import load_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "defect_tune"


class _Payload:
    """What a tampered checkpoint carries: unpickling it would run `touch`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "best.pt"
    torch.save({"weights": _Payload(marker)}, path)
    model = build_model(load_config(None, {"model": "el_cnn", "pretrained": False}), 3)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path, model)
    assert not marker.exists()


def test_yaml_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "config.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load_config(path)
    assert not marker.exists()


def test_the_package_loads_nothing_unsafely():
    """Every torch.load passes weights_only=True; no yaml.load/unsafe_load, pickle or eval."""
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load)\(|pickle\.loads?\(|(?<![.\w])(eval|exec)\(")
    checked = 0
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text()
        assert not unsafe.search(text), f"{source}: {unsafe.search(text).group(0)}"
        for node in ast.walk(ast.parse(text)):  # every call, however it is wrapped over lines
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load") and (
                    ast.unparse(node.func) == "torch.load" or "from torch import load" in text):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                assert safe, f"{source}:{node.lineno}: {ast.unparse(node)}"
                checked += 1
    assert checked >= 4  # the checkpoint, weights and retrain loads were all seen
