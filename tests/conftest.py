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


@pytest.fixture(scope="session")
def ds_ops() -> None:
    """JIT-build DeepSpeed's CPU ops once, in one process, before any test that launches DeepSpeed ranks (cached in
    TORCH_EXTENSIONS_DIR; ~1-2 min cold on 2 cores). Otherwise the first multi-rank test builds them inside its own
    timeout while the other xdist worker takes a core (a cold CI clone timed out so, 300 s)."""
    import subprocess
    import sys

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    code = ("from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder, CPUAdamBuilder, FusedAdamBuilder\n"
            "for b in (ShareMemCommBuilder, CPUAdamBuilder, FusedAdamBuilder): b().load()\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) these tests run one after another on
# one worker: they launch trainers, time-out children, kill processes, hold run-dir locks or time a preflight, and
# stay deterministic when only the other worker's CPU-bound tests (the estimate, the traces) run beside them.
PROCESS_TESTS = ("reliability/", "train/", "test_run_e2e.py", "test_run_cli.py", "test_run_loop.py", "test_run_lock.py",
                 "test_launch.py", "test_preflight_cli.py", "test_preflight_unit.py", "test_calibrate.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = Path(str(item.fspath)).relative_to(REPO / "tests").as_posix()
        if rel.startswith(PROCESS_TESTS) or rel in PROCESS_TESTS:
            item.add_marker(pytest.mark.xdist_group("processes"))
    gpu_items = [i for i in items if "gpu" in i.keywords]
    if gpu_items and not _has_cuda_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    return REPO


# The reliability figures (tests/reliability/figures.py): tallied by the tests, added up over pytest-xdist
# workers (each hands its tallies to the controller in `workeroutput`), printed once at the end.
def _figures():
    from reliability import figures  # tests/ is on sys.path (rootdir conftest, prepend import mode)

    return figures


def pytest_sessionfinish(session):
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        f = _figures()
        out["reliability_figures"] = dict(f.FIGURES)
        out["reliability_exit_codes"] = {str(k): v for k, v in f.EXIT_CODES.items()}


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown (and never called) without xdist
def pytest_testnodedown(node, error):
    out = getattr(node, "workeroutput", {})
    f = _figures()
    f.FIGURES.update(out.get("reliability_figures", {}))
    f.EXIT_CODES.update({int(k): v for k, v in out.get("reliability_exit_codes", {}).items()})


def pytest_terminal_summary(terminalreporter):
    f = _figures()
    if f.FIGURES or f.EXIT_CODES:
        terminalreporter.write_line(f.summary_line())
