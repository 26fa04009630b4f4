"""Layers point one way (entry -> lit -> model; data -> text/audio): the model's modules import neither the
Lightning layer nor the data layer, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "most_lightning" / "model"
FORBIDDEN = ("most_lightning.lit", "most_lightning.data")


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (relative imports resolved against most_lightning.model)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from ..data import x  ->  most_lightning.data
                base = "most_lightning.model".split(".")[: 2 - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_model_modules_import_neither_lit_nor_data(path):
    crossing = [name for name in imported_modules(path)
                if any(name == layer or name.startswith(layer + ".") for layer in FORBIDDEN)]
    assert crossing == [], f"most_lightning/model/{path.name} imports {crossing}"


def test_the_import_reader_sees_relative_and_absolute_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import most_lightning.lit.module\nfrom ..data.continuous import x\n"
                     "def f():\n    from .loss import y\n")
    assert imported_modules(probe) == ["most_lightning.lit.module", "most_lightning.data.continuous",
                                       "most_lightning.model.loss"]
