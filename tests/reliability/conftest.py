"""The `tiny` fixture (the tiny model). tests/conftest.py prints the reliability figures (figures.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny LLaVA model dir and its dataset (python -m train.tiny), built once per test module."""
    out = tmp_path_factory.mktemp("tiny")
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    subprocess.run([sys.executable, "-m", "train.tiny", "--out", str(out)], check=True, capture_output=True,
                   env=env, timeout=120)
    return out

