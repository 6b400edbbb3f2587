"""`ruff check` over the repository with the settings in pyproject.toml ([tool.ruff])."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it is in the `dev` extra: pip install -e '.[dev]')")
def test_ruff_check_passes():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        pytest.fail(f"ruff check found problems (fix them; `ruff check --fix .` does the safe ones):\n"
                    f"{p.stdout}{p.stderr}", pytrace=False)
