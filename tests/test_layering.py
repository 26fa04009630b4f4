"""Layers point one way (docs/DESIGN: entry -> lit -> model; data -> text/audio; eval -> lit/model/data): every
import of the package's own modules, read from the source with ast (lazy imports inside functions included),
stays inside the layers each layer may use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "most_lightning"

# Top-level helper modules any layer may use: each imports nothing of the package (checked below).
LEAVES = {"marks", "state_dicts", "checkpoint_safety"}

# layer -> the other layers it may import
ALLOWED = {
    "model": set(),  # no Lightning (lit), no data, no eval
    "text": set(),
    "audio": set(),
    "metrics": set(),  # pure functions: the eval tasks and the LitModule both use them
    "data": {"text", "audio"},
}

# Command-line entry points inside a layer's folder sit above every layer (entry -> lit -> model).
ENTRY_POINTS = {"model/checkpoint/__main__.py"}

def package_imports(path: Path) -> set[str]:
    """The top-level names under most_lightning that ``path`` imports (absolute or relative)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1]  # the package a relative import starts from (an __init__ is its own package's)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:  # from . import x, y: x and y are modules of that package
                    names = [".".join(base + [alias.name]) for alias in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "most_lightning" and len(parts) > 1:
                found.add(parts[1])
    return found


def layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_point_one_way(layer):
    assert layer_files(layer), f"most_lightning/{layer} has no modules"
    crossings = []
    for path in layer_files(layer):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ENTRY_POINTS:
            continue
        allowed = {layer} | ALLOWED[layer] | LEAVES
        crossings += [f"{rel} imports most_lightning.{name}" for name in sorted(package_imports(path) - allowed)]
    assert not crossings, "\n".join(crossings)


def test_leaves_import_nothing_of_the_package():
    for leaf in sorted(LEAVES):
        assert package_imports(PACKAGE / f"{leaf}.py") == set(), leaf


def test_the_import_reader_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """The oracle for the reader itself: a file with each kind of import."""
    fake = tmp_path / "most_lightning"
    (fake / "data").mkdir(parents=True)
    source = fake / "data" / "mod.py"
    source.write_text("import most_lightning.text.tokenizer\nfrom ..model import config\n"
                      "from . import streams\nfrom .. import lit\n"
                      "def f():\n    from most_lightning.eval.asr import x\n    import torch\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert package_imports(source) == {"text", "model", "data", "lit", "eval"}
