"""Type checks of the run-dir files vramplan reads back (docs/contracts.md "Run directory").

summary.json and attempts.json are written by the trainer and by `vramplan run`, but a run dir can be
edited, truncated or copied from another version: `calibrate` and `run --resume` check the fields they
use with the shared validators (vramplan.contract.require) and raise ContractError naming the file and
the field (exit 2), not a KeyError.
"""

from __future__ import annotations

from pathlib import Path

from vramplan.contract import ContractError, require, shown, value_problem

HINT = "the run dir's files were edited or damaged; rerun `vramplan run` (or fix the field)"
COUNT = (int, 0)  # a whole number >= 0
COUNTS = (list, 0)  # a list of whole numbers >= 0

# field -> (kind, min); a field missing or null is fine (older runs wrote fewer)
SUMMARY_FIELDS = {
    "status": (str, None), "steps": COUNT, "tokens": COUNT, "train_seconds": (float, None),
    "wall_seconds": (float, None), "save_seconds": (float, None), "peak_allocated_bytes": COUNTS,
    "peak_reserved_bytes": COUNTS, "peak_rss_bytes": COUNTS, "checkpoint_bytes": COUNT, "final_dir": (str, None),
    "last_checkpoint": (str, None), "device": (str, None), "world_size": COUNT, "estimate": (dict, None),
}
ATTEMPT_FIELDS = {"attempt": COUNT, "dir": (str, None), "kind": (str, None), "steps": COUNT,
                  "returncode": (int, None), "wall_seconds": (float, None), "plan": (dict, None),
                  "failure": (dict, None)}


def check_fields(path: Path, obj: dict, fields: dict[str, tuple], prefix: str = "") -> None:
    """Each field present and not null must be of its kind (and >= its min)."""
    for key, (kind, lo) in fields.items():
        value = require(obj, key, kind, str(path), label=prefix + key, min=None if kind is list else lo,
                        allow_none=True, default=None, hint=HINT)
        if kind is list and value is not None:
            for i, item in enumerate(value):
                problem = value_problem(item, int, min=lo)
                if problem:
                    raise ContractError(f"{path}: {prefix}{key}[{i}]: {problem}", HINT)


def _object(path: Path, doc, label: str) -> dict:
    if not isinstance(doc, dict):
        raise ContractError(f"{path}: {label}must be a JSON object, got {shown(doc)}", HINT)
    return doc


def check_summary(path: Path, summary) -> dict:
    """summary.json: an object whose known fields have their types (null allowed)."""
    check_fields(path, _object(path, summary, ""), SUMMARY_FIELDS)
    return summary


def check_attempts(path: Path, doc) -> list:
    """attempts.json: {"attempts": [{...}, ...]} whose records' known fields have their types."""
    attempts = require(_object(path, doc, ""), "attempts", list, str(path), allow_none=True, default=None,
                       hint=HINT) or []
    for i, a in enumerate(attempts):
        check_fields(path, _object(path, a, f"attempts[{i}]: "), ATTEMPT_FIELDS, f"attempts[{i}].")
        # every attempt ran somewhere: resume and calibrate go there
        require(a, "dir", str, str(path), label=f"attempts[{i}].dir", hint=HINT)
    return attempts
