"""Exit codes and the error types that carry them.

Library code raises a :class:`VramplanError` subclass; only the CLI boundary turns it into
one line on stderr (or a JSON envelope on stdout) and an exit code. The codes are
`vramplan.contract.ExitCode` (shared with the trainer; README "Exit codes"; a test pins the table).
"""

from __future__ import annotations

from vramplan.contract import ExitCode

__all__ = ["ExitCode", "NoFitError", "PreflightFailed", "ProfileError", "UsageError", "VramplanError"]


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
