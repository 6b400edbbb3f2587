"""The errors of `python -m train` and the exit codes they carry (`vramplan.contract.ExitCode`, the one
table shared with vramplan; README "Exit codes")."""

from __future__ import annotations

from vramplan.contract import ContractError, ExitCode

__all__ = ["DatasetError", "DiskFullError", "ExitCode", "TrainError", "UsageError", "is_oom"]


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

    @classmethod
    def from_contract(cls, e: ContractError, prefix: str = "") -> UsageError:
        """A shared-file problem (plan, recipe profile) as this trainer's usage error."""
        return cls(prefix + e.message, e.hint)


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
