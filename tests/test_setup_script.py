"""The README's two commands: single pasteable lines through the project's .venv, the same lines in .ci/run, and
setup.sh's refusals (bad arguments, a Python older than 3.11) before it touches apt or pip."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

MAIN_LINE = "bash setup.sh && .venv/bin/python run.py"
TEST_LINE = "bash setup.sh --dev && .venv/bin/python -m pytest"


def _readme_two_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Two commands"):text.index("## What a run does")]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_commands_are_single_lines_through_the_venv():
    assert _readme_two_commands() == [MAIN_LINE, TEST_LINE]


def test_ci_runs_the_readme_test_line():
    lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST_LINE in lines


def test_venv_is_ignored_by_git():
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=REPO_ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", ".venv", ".venv/bin/python"], cwd=REPO_ROOT, capture_output=True,
                             text=True)
    assert ignored.stdout.split() == [".venv", ".venv/bin/python"]


def _setup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "setup.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_setup_rejects_an_unknown_argument():
    result = _setup("--devv")
    assert result.returncode == 2 and "unknown argument '--devv' (allowed: --dev, --no-venv, --help)" in result.stderr


def test_setup_refuses_a_python_older_than_3_11(tmp_path: Path):
    fake = tmp_path / "python3.9"
    fake.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.9 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    result = _setup(env={"PYTHON": str(fake), "VIRTUAL_ENV": "", "CONDA_PREFIX": ""})
    assert result.returncode == 1
    assert f"{fake} is Python 3.9; most_lightning needs Python >= 3.11" in result.stderr
    assert "PYTHON=python3.11 bash setup.sh" in result.stderr
    assert "pip install" not in result.stdout  # it stopped before installing anything
