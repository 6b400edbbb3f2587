"""Calibration files and the run dirs they are made from.

A run dir (docs/contracts.md) holds `summary.json` (measured peaks, sizes, time, and the plan's
`estimate` copied in) and `plan.json`. `load_run()` reads every finished attempt of one and turns it
into rows with calibration_math.compare(); `vramplan calibrate` aggregates rows into correction factors
and writes them with `write_calibration()`. The estimate applies them only when given
`vramplan estimate --calibration FILE`; it reads the file with `load_calibration()`.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.run.calibration_math import COMPONENTS, FACTOR_RANGE, compare
from vramplan.units import utc_stamp

SCHEMA = "vramplan-calibration/1"


def _read_json(path: Path) -> dict | None:
    return _read_checked(path, lambda _path, obj: obj if isinstance(obj, dict) else None)


def dir_bytes(path: Path) -> int:
    total = 0
    if path.is_file():
        return path.stat().st_size
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def resumed_at(run_dir: Path) -> int:
    """The step the last trainer process started from (its `start` event in metrics.jsonl); 0 if fresh."""
    step = 0
    try:
        with open(run_dir / "metrics.jsonl") as f:
            for line in f:
                if '"start"' in line:
                    try:
                        step = int(json.loads(line).get("step") or 0)
                    except (ValueError, TypeError, AttributeError):
                        pass
    except OSError:
        return 0
    return step


def compare_run(summary: dict, plan: dict | None, run_dir: Path) -> list[dict]:
    """compare() for the attempt in `run_dir`, with what only its files tell: outputs on disk, the resume step."""
    outputs = sum(dir_bytes(run_dir / d) for d in ("checkpoints", "final") if (run_dir / d).exists())
    return compare(summary, plan, outputs_bytes=outputs, resumed_at=resumed_at(run_dir))


def _read_checked(path: Path, check):
    """A run-dir file through its type check (run_files.py); None when missing; exit 2 naming the field."""
    from vramplan.contract import ContractError

    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"{path}: not readable JSON ({e})", "is the run finished? the file may be truncated") from e
    try:
        return check(path, obj)
    except ContractError as e:
        raise UsageError(e.message, e.hint) from None


def _attempt_dirs(run_dir: Path) -> tuple[list[Path], Path | None]:
    """The attempt dirs of a run dir where it is now, and where an old (absolute-path) run dir was written."""
    from vramplan.run.owner import repair_if_orphaned  # its vramplan died: "running" -> "abandoned"
    from vramplan.run.relocate import attempts_here, old_location
    from vramplan.run.run_files import check_attempts

    root = run_dir.resolve()
    attempts = _read_checked(run_dir / "attempts.json", check_attempts)
    if not attempts:
        return [run_dir, *sorted(p for p in run_dir.glob("attempt-*") if p.is_dir())], old_location(root)
    old = old_location(root, attempts)
    # dirs are stored relative to the run dir; an old run dir's absolute ones are moved to where it is now
    attempts = repair_if_orphaned(run_dir, attempts_here(root, attempts))
    return [Path(a["dir"]) for a in attempts if a.get("dir")] or [run_dir], old


def load_run(run_dir: str | Path) -> list[dict]:
    """Every finished attempt in a run dir: [{"dir", "status", "rows", "summary", "failure"}]."""
    from vramplan.run.relocate import plan_here
    from vramplan.run.run_files import check_summary

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a directory", "give the --output dir of a `vramplan run`")
    dirs, old = _attempt_dirs(run_dir)
    out, seen = [], set()
    for d in dirs:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        summary = _read_checked(d / "summary.json", check_summary)
        failure = _read_json(d / "failure.json")
        if summary is None and failure is None:
            continue
        plan = _read_json(d / "plan.json")
        plan = plan_here(plan, d.resolve(), run_dir.resolve(), old) if plan is not None else None
        status = (summary or {}).get("status") or (failure or {}).get("kind", "error")
        rows = compare_run(summary, plan, d) if summary and status == "ok" else []
        out.append({"dir": str(d), "status": status, "rows": rows, "summary": summary, "failure": failure,
                    "plan": plan})
    if not out:
        raise UsageError(f"{run_dir}: no summary.json or failure.json found",
                         "calibrate reads finished runs; run `vramplan run` first (or wait for it to end)")
    return out


def write_calibration(path: str | Path, fac: dict[str, float], sources: list[str]) -> Path:
    """Write `fac` as TOML (a .toml suffix) or JSON (anything else)."""
    path = Path(path)
    created = utc_stamp()
    if path.suffix == ".toml":
        lines = [f'schema = "{SCHEMA}"', f'created_utc = "{created}"',
                 "sources = [" + ", ".join(json.dumps(s) for s in sources) + "]", "", "[factors]"]
        lines += [f"{k} = {float(v)!r}" for k, v in sorted(fac.items())]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps({"schema": SCHEMA, "created_utc": created, "sources": sources,
                                    "factors": dict(sorted(fac.items()))}, indent=2) + "\n")
    return path


def load_calibration(path: str | Path) -> dict[str, float]:
    """Read a calibration file (TOML or JSON) -> {component: factor}. Bad files raise UsageError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"calibration file {path}: {e.strerror or e}",
                         "write one with `vramplan calibrate RUN_DIR --write FILE`") from e
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            doc = tomllib.loads(text)
        else:
            doc = json.loads(text)
    except ValueError as e:
        raise UsageError(f"calibration file {path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})",
                         "write one with `vramplan calibrate RUN_DIR --write FILE`") from e
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("factors"), dict):
        raise UsageError(f"calibration file {path}: expected schema {SCHEMA!r} with a [factors] table",
                         "write one with `vramplan calibrate RUN_DIR --write FILE`")
    out = {}
    for key, value in doc["factors"].items():
        if key not in COMPONENTS:
            close = difflib.get_close_matches(key, COMPONENTS, n=1)
            raise UsageError(f"calibration file {path}: factors.{key}: unknown component"
                             + (f" (did you mean {close[0]!r}?)" if close else ""),
                             "known: " + ", ".join(COMPONENTS))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not FACTOR_RANGE[0] <= value <= FACTOR_RANGE[1]:
            raise UsageError(f"calibration file {path}: factors.{key} = {value!r}: must be a number in [0.05, 20]",
                             "a factor is measured / estimated; regenerate the file with `vramplan calibrate`")
        out[key] = float(value)
    return out
