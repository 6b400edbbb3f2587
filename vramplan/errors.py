"""Exit codes and the error types that carry them.

Library code raises a :class:`VramplanError` subclass; only the CLI boundary turns it into
one line on stderr (or a JSON envelope on stdout) and an exit code. The table below is the
documented contract (README "Exit codes"); a test pins it.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of every `vramplan` command (and of the bundled trainer)."""

    OK = 0  # success; for `estimate`, at least one candidate fits
    ERROR = 1  # unexpected internal error (a bug: please report it with VRAMPLAN_DEBUG=1)
    USAGE = 2  # bad input: unknown flag/GPU/model, broken profile, missing path, bad dataset
    NO_FIT = 3  # estimate/plan: no candidate fits the given hardware
    PREFLIGHT_FAILED = 4  # preflight: at least one check FAILed (or WARNed under --strict)
    TRAIN_FAILED = 5  # run: the trainer exited with an error that is not OOM or disk-full
    OUT_OF_MEMORY = 6  # trainer: out of memory (run --auto: every fallback plan ran out of memory)
    DISK_FULL = 7  # trainer: a checkpoint could not be written safely; last good one kept
    INTERRUPTED = 130  # Ctrl-C / SIGTERM: stopped cleanly, last verified checkpoint kept


class VramplanError(Exception):
    """An error with a user-facing message, a fix hint and an exit code.

    Args:
        message: one line saying what is wrong.
        hint: one line saying how to fix it (may be empty).
        code: a short machine-readable error code for the JSON envelope.
    """

    exit_code: ExitCode = ExitCode.ERROR
    default_code = "error"

    def __init__(self, message: str, hint: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code or self.default_code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class UsageError(VramplanError):
    """Bad user input (flags, names, paths, files)."""

    exit_code = ExitCode.USAGE
    default_code = "usage"


class ProfileError(UsageError):
    """A profile file is broken: names the file and the key."""

    default_code = "profile_invalid"

    def __init__(self, file: str, key: str, problem: str, hint: str = "") -> None:
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}", hint)
        self.file = file
        self.key = key

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(file=self.file, key=self.key)
        return d


class NoFitError(VramplanError):
    """Nothing fits (used when a command must have a fitting plan, e.g. `run --auto`)."""

    exit_code = ExitCode.NO_FIT
    default_code = "no_fit"


class PreflightFailed(VramplanError):
    exit_code = ExitCode.PREFLIGHT_FAILED
    default_code = "preflight_failed"
