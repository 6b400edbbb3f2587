"""Shared fixtures for the trainer tests: one tiny LLaVA + dataset (+ parts) per session, a subprocess runner."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """tiny/model (HF LLaVA), tiny/data.json (8 records, 2 distinct, repeated), tiny/images, tiny/parts."""
    from train.tiny import build

    return build(tmp_path_factory.mktemp("tiny"), samples=8, distinct=2, parts=True)
