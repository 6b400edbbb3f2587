"""Exit codes of `python -m train` (docs/contracts.md) and the errors that carry them.

The numbers equal `vramplan.errors.ExitCode` (a test pins it); the trainer never imports vramplan.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # unexpected internal error
    USAGE = 2  # bad flag / plan / path / dataset record
    NO_FIT = 3  # (vramplan only)
    PREFLIGHT_FAILED = 4  # (vramplan only)
    TRAIN_FAILED = 5  # (vramplan run: the trainer failed otherwise)
    OUT_OF_MEMORY = 6  # out of GPU/CPU memory; failure.json written
    DISK_FULL = 7  # a checkpoint could not be written safely; last verified one intact; failure.json written
    INTERRUPTED = 130  # SIGINT/SIGTERM: stopped at a step boundary


class TrainError(Exception):
    """An error with one user-facing line, a fix hint and an exit code."""

    exit_code = ExitCode.ERROR
    kind = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(TrainError):
    exit_code = ExitCode.USAGE
    kind = "error"


class DatasetError(UsageError):
    """A bad dataset record; the message names the record index and id."""


class DiskFullError(TrainError):
    exit_code = ExitCode.DISK_FULL
    kind = "disk_full"


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA/NPU), a RuntimeError saying "out of memory", or MemoryError (CPU)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
