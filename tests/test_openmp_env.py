"""OpenMP defaults (most_lightning/openmp_env.py): set by importing the package before torch, never over the
user's own value, never after torch loaded libgomp (where they would not act). Fresh interpreters: the test
process itself imported torch long ago."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from most_lightning.openmp_env import OPENMP_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
PRINT_SPIN = "import os; print(os.environ.get('GOMP_SPINCOUNT', 'unset'))"


def fresh_python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | env
    result = subprocess.run([sys.executable, "-c", code], env=environ, cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return result.stdout.strip().splitlines()[-1]


def test_package_import_sets_the_spin_default():
    assert fresh_python("import most_lightning; " + PRINT_SPIN) == OPENMP_DEFAULTS["GOMP_SPINCOUNT"]


def test_the_users_value_wins():
    assert fresh_python("import most_lightning; " + PRINT_SPIN, GOMP_SPINCOUNT="1234") == "1234"


def test_nothing_is_set_once_torch_is_loaded():
    assert fresh_python("import torch, most_lightning; " + PRINT_SPIN) == "unset"


@pytest.mark.parametrize("module", ["run", "experiments.bench_moe"])
def test_entry_points_load_torch_after_the_defaults(module):
    """run.py and the benchmarks must import most_lightning before anything imports torch."""
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'torch' and 'torch' not in sys.modules:\n"
            "        import os; print('torch loaded with', os.environ.get('GOMP_SPINCOUNT', 'unset'))\n"
            "    return real(name, *a, **k)\n"
            f"builtins.__import__ = spy\nsys.path.insert(0, 'experiments')\nimport {module}\n"
            "import torch  # in case the module never loads it itself\n")
    assert fresh_python(code) == f"torch loaded with {OPENMP_DEFAULTS['GOMP_SPINCOUNT']}"
