"""Shared test setup: offline hub, DeepSpeed on CPU, GPU tests skipped without a GPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# No network at test time; DeepSpeed prints its accelerator warning to stdout unless told.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-built ops (cpu_adam, shm_comm) are cached between tests and CI runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    gpu_items = [i for i in items if "gpu" in i.keywords]
    if gpu_items and not _has_cuda_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    return REPO
