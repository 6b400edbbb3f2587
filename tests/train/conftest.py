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


@pytest.fixture(scope="session")
def ds_ops() -> None:
    """JIT-build DeepSpeed's CPU ops once, in one process, before any torchrun test (cached in
    TORCH_EXTENSIONS_DIR; ~1 min cold). Otherwise two ranks build concurrently inside a test's timeout."""
    import subprocess
    import sys

    from trainhelpers import train_env

    code = ("from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder, CPUAdamBuilder, FusedAdamBuilder\n"
            "for b in (ShareMemCommBuilder, CPUAdamBuilder, FusedAdamBuilder): b().load()\n")
    p = subprocess.run([sys.executable, "-c", code], env=train_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
