"""Measured vs estimated, per component, and calibration files.

A run dir (docs/contracts.md) holds `summary.json` (measured peaks, sizes, time, and the plan's
`estimate` copied in) and `plan.json`. `compare()` turns one into rows; `vramplan run` prints them
at the end of a run and `vramplan calibrate` aggregates them over many runs into correction factors:

    factor[component] = measured / estimated

aggregated over runs with the MAX for memory and disk (after calibration the estimate should never
be low: a low memory estimate is an OOM) and the MEDIAN for time (no safety side). The estimate
applies them only when given `vramplan estimate --calibration FILE`; it reads the file with
`load_calibration()`.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import statistics
from pathlib import Path

from vramplan.errors import UsageError

SCHEMA = "vramplan-calibration/1"

# component -> (label, kind). kind: "bytes" | "seconds"
COMPONENTS: dict[str, tuple[str, str]] = {
    "vram_allocated": ("peak allocated per GPU (torch allocator)", "bytes"),
    "vram_reserved": ("peak reserved per GPU (~ nvidia-smi)", "bytes"),
    "cpu_ram": ("CPU RAM (peak RSS, all ranks)", "bytes"),
    "cpu_process_memory": ("memory per process (CPU run: peak RSS)", "bytes"),
    "checkpoint": ("one checkpoint on disk", "bytes"),
    "disk": ("run outputs on disk (checkpoints + final)", "bytes"),
    "time_per_step": ("time per optimizer step", "seconds"),
}
MAX_AGGREGATED = {"vram_allocated", "vram_reserved", "cpu_ram", "cpu_process_memory", "checkpoint", "disk"}


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not readable JSON ({e})", "is the run finished? the file may be truncated") from e
    return obj if isinstance(obj, dict) else None


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


def planned_steps(plan: dict) -> int | None:
    """Optimizer steps the estimate's time covers: ceil(samples x epochs / global batch), or max_steps."""
    est = plan.get("estimate") or {}
    if est.get("steps"):
        return int(est["steps"])
    recipe, batch, data = plan.get("recipe") or {}, plan.get("batch") or {}, plan.get("data") or {}
    if recipe.get("max_steps"):
        return int(recipe["max_steps"])
    samples, gb = data.get("samples"), batch.get("global_batch")
    if not samples or not gb:
        return None
    return max(1, math.ceil(int(samples) * int(recipe.get("epochs") or 1) / int(gb)))


def _resumed_at(run_dir: Path) -> int:
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


def _row(component: str, measured, estimated, note: str = "") -> dict:
    label, unit = COMPONENTS[component]
    ratio = (measured / estimated) if (measured is not None and estimated) else None
    return {"component": component, "label": label, "unit": unit, "measured": measured, "estimated": estimated,
            "ratio": ratio, "error_pct": None if ratio is None else round((ratio - 1) * 100, 1), "note": note}


def compare(summary: dict, plan: dict | None, run_dir: Path | None = None) -> list[dict]:
    """Rows of measured vs estimated for one finished attempt (`summary.json` + `plan.json`)."""
    plan = plan or {}
    est = summary.get("estimate") or plan.get("estimate") or {}
    device = summary.get("device") or (plan.get("hardware") or {}).get("device") or "cuda"
    world = int(summary.get("world_size") or (plan.get("hardware") or {}).get("total_gpus") or 1)
    rows = []
    alloc = summary.get("peak_allocated_bytes") or []
    reserved = summary.get("peak_reserved_bytes") or []
    rss = summary.get("peak_rss_bytes") or []
    if device != "cpu":
        rows.append(_row("vram_allocated", max(alloc) if alloc else None, est.get("vram_allocated_per_gpu_bytes")))
        rows.append(_row("vram_reserved", max(reserved) if reserved else None, est.get("vram_per_gpu_bytes")))
        rows.append(_row("cpu_ram", sum(rss) if rss else None, est.get("cpu_ram_bytes")))
    else:
        from vramplan.run.progress import estimated_memory

        rows.append(_row("cpu_process_memory", max(rss) if rss else None, estimated_memory(est, "cpu", world),
                         "CPU run: the estimate's per-process peak (device = this CPU)"))
    rows.append(_row("checkpoint", summary.get("checkpoint_bytes"), est.get("checkpoint_bytes")))
    if run_dir is not None:
        measured = sum(dir_bytes(run_dir / d) for d in ("checkpoints", "final") if (run_dir / d).exists())
        breakdown = est.get("disk_breakdown") or {}
        outputs = [v for k, v in breakdown.items()
                   if any(w in k for w in ("checkpoint", "export", "adapter", "final", "projector"))]
        if outputs:
            rows.append(_row("disk", measured, sum(outputs), "estimate: checkpoint and export parts of disk_bytes"))
        else:
            rows.append(_row("disk", measured, None, f"estimate gives only the total {est.get('disk_bytes')} B "
                                                      "(with weights and dataset): not comparable"))
    steps, train_s, n_planned = summary.get("steps"), summary.get("train_seconds"), planned_steps(plan)
    resumed_at = _resumed_at(run_dir) if run_dir is not None else 0
    if steps and resumed_at and steps > resumed_at:  # train_seconds covers the resumed process only
        steps -= resumed_at
    measured_step = (train_s / steps) if (steps and train_s is not None) else None
    est_step = (est["time_seconds"] / n_planned) if (est.get("time_seconds") and n_planned) else None
    rows.append(_row("time_per_step", measured_step, est_step, f"{steps} measured steps; estimate covers {n_planned}"))
    return rows


def load_run(run_dir: str | Path) -> list[dict]:
    """Every finished attempt in a run dir: [{"dir", "status", "rows", "summary", "failure"}]."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: not a directory", "give the --output dir of a `vramplan run`")
    dirs = [run_dir]
    attempts = _read_json(run_dir / "attempts.json")
    if attempts:
        dirs = [Path(a["dir"]) for a in attempts.get("attempts", []) if a.get("dir")] or dirs
    else:
        dirs += sorted(p for p in run_dir.glob("attempt-*") if p.is_dir())
    out, seen = [], set()
    for d in dirs:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        summary = _read_json(d / "summary.json")
        failure = _read_json(d / "failure.json")
        if summary is None and failure is None:
            continue
        plan = _read_json(d / "plan.json")
        status = (summary or {}).get("status") or (failure or {}).get("kind", "error")
        rows = compare(summary, plan, d) if summary and status == "ok" else []
        out.append({"dir": str(d), "status": status, "rows": rows, "summary": summary, "failure": failure,
                    "plan": plan})
    if not out:
        raise UsageError(f"{run_dir}: no summary.json or failure.json found",
                         "calibrate reads finished runs; run `vramplan run` first (or wait for it to end)")
    return out


FACTOR_RANGE = (0.05, 20.0)  # outside it the two numbers measure different things; never a correction


def outliers(runs: list[dict]) -> list[str]:
    """Rows whose ratio is outside FACTOR_RANGE, said in one line each (not used as factors)."""
    lo, hi = FACTOR_RANGE
    return [f"{run['dir']}: {row['component']}: measured/estimated = {row['ratio']:.3g} is outside [{lo}, {hi}]; "
            "not used (not comparable at this scale)"
            for run in runs for row in run["rows"] if row["ratio"] is not None and not lo <= row["ratio"] <= hi]


def factors(runs: list[dict]) -> dict[str, float]:
    """Correction factors from finished-ok attempts (max of ratios for memory/disk, median for time)."""
    lo, hi = FACTOR_RANGE
    ratios: dict[str, list[float]] = {}
    for run in runs:
        for row in run["rows"]:
            if row["ratio"] is not None and lo <= row["ratio"] <= hi:
                ratios.setdefault(row["component"], []).append(row["ratio"])
    return {k: float(f"{(max(v) if k in MAX_AGGREGATED else statistics.median(v)):.4g}") for k, v in ratios.items()}


def write_calibration(path: str | Path, fac: dict[str, float], sources: list[str]) -> Path:
    """Write `fac` as TOML (a .toml suffix) or JSON (anything else)."""
    path = Path(path)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
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


def render_rows(console, rows: list[dict], title: str) -> None:
    from rich.table import Table
    from rich.text import Text

    from vramplan.run.progress import fmt_bytes, fmt_seconds

    def fmt(row, v):
        if v is None:
            return "n/a"
        if row["unit"] == "bytes":
            return fmt_bytes(v)
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s" if v < 120 else fmt_seconds(v)

    table = Table(title=Text(title), title_justify="left")
    for col in ("component", "measured", "estimated", "error", "note"):
        table.add_column(col, justify="right" if col in ("measured", "estimated", "error") else "left")
    for r in rows:
        err = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        table.add_row(Text(r["label"]), fmt(r, r["measured"]), fmt(r, r["estimated"]), err, Text(r["note"]))
    console.print(table)
