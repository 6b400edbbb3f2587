"""Type checks of the run-dir files vramplan reads back (docs/contracts.md "Run directory").

summary.json and attempts.json are written by the trainer and by `vramplan run`, but a run dir can be
edited, truncated or copied from another version: `calibrate` and `run --resume` check the fields they
use and raise vramplan.contract.ContractError naming the file and the field (exit 2), not a KeyError.
"""

from __future__ import annotations

import math
from pathlib import Path

from vramplan.contract import ContractError

HINT = "the run dir's files were edited or damaged; rerun `vramplan run` (or fix the field)"
_NUMBER = "a number"
_COUNT = "a whole number >= 0"
_TEXT = "a string"
_COUNTS = "a list of whole numbers >= 0"


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


CHECKS = {
    _NUMBER: _is_number,
    _COUNT: _is_count,
    _TEXT: lambda v: isinstance(v, str),
    _COUNTS: lambda v: isinstance(v, list) and all(_is_count(x) for x in v),
    "an object": lambda v: isinstance(v, dict),
}

SUMMARY_FIELDS = {
    "status": _TEXT, "steps": _COUNT, "tokens": _COUNT, "train_seconds": _NUMBER, "wall_seconds": _NUMBER,
    "save_seconds": _NUMBER, "peak_allocated_bytes": _COUNTS, "peak_reserved_bytes": _COUNTS,
    "peak_rss_bytes": _COUNTS, "checkpoint_bytes": _COUNT, "final_dir": _TEXT, "last_checkpoint": _TEXT,
    "device": _TEXT, "world_size": _COUNT, "estimate": "an object",
}
ATTEMPT_FIELDS = {"attempt": _COUNT, "dir": _TEXT, "kind": _TEXT, "steps": _COUNT, "returncode": "an integer",
                  "wall_seconds": _NUMBER, "plan": "an object", "failure": "an object"}
CHECKS["an integer"] = lambda v: isinstance(v, int) and not isinstance(v, bool)


def _bad(path: Path, field: str, want: str, value) -> ContractError:
    shown = repr(value)
    return ContractError(f"{path}: {field} must be {want}, not {shown[:60]}", HINT)


def check_fields(path: Path, obj: dict, fields: dict[str, str], prefix: str = "") -> None:
    """Each field present and not null must be of its kind."""
    for key, want in fields.items():
        value = obj.get(key)
        if value is not None and not CHECKS[want](value):
            raise _bad(path, prefix + key, want, value)


def check_summary(path: Path, summary) -> dict:
    """summary.json: an object whose known fields have their types (null allowed)."""
    if not isinstance(summary, dict):
        raise ContractError(f"{path}: must be a JSON object, not {type(summary).__name__}", HINT)
    check_fields(path, summary, SUMMARY_FIELDS)
    return summary


def check_attempts(path: Path, doc) -> list:
    """attempts.json: {"attempts": [{...}, ...]} whose records' known fields have their types."""
    if not isinstance(doc, dict):
        raise ContractError(f"{path}: must be a JSON object, not {type(doc).__name__}", HINT)
    attempts = doc.get("attempts")
    if attempts is None:
        return []
    if not isinstance(attempts, list):
        raise _bad(path, "attempts", "a list", attempts)
    for i, a in enumerate(attempts):
        if not isinstance(a, dict):
            raise _bad(path, f"attempts[{i}]", "an object", a)
        check_fields(path, a, ATTEMPT_FIELDS, f"attempts[{i}].")
        if not isinstance(a.get("dir"), str):  # every attempt ran somewhere: resume and calibrate go there
            raise _bad(path, f"attempts[{i}].dir", _TEXT, a.get("dir"))
    return attempts
