"""Measured vs estimated, per component, and correction factors: pure functions on dicts.

One finished attempt gives rows (`compare`: its `summary.json` and `plan.json`, docs/contracts.md);
many give correction factors (`factors`):

    factor[component] = measured / estimated

aggregated over runs with the MAX for memory and disk (after calibration the estimate should never
be low: a low memory estimate is an OOM) and the MEDIAN for time (no safety side). Reading run dirs
and calibration files is calibration.py.
"""

from __future__ import annotations

import math
import statistics

from vramplan.run.progress import estimated_memory

# component -> (label, kind). kind: "bytes" | "seconds"
COMPONENTS: dict[str, tuple[str, str]] = {
    "vram_allocated": ("peak allocated per GPU (torch allocator)", "bytes"),
    "vram_reserved": ("peak reserved per GPU (~ nvidia-smi)", "bytes"),
    "cpu_ram": ("CPU RAM (peak RSS, all ranks)", "bytes"),
    "cpu_process_memory": ("memory per process (CPU run: peak RSS)", "bytes"),
    "checkpoint": ("one checkpoint on disk", "bytes"),
    "disk": ("run outputs on disk (checkpoints + final)", "bytes"),
    "time_per_step": ("time per optimizer step", "seconds"),
    "time_band_low": ("time band, low end (x the calibrated time)", "ratio"),
    "time_band_high": ("time band, high end (x the calibrated time)", "ratio"),
}
BAND_COMPONENTS = ("time_band_low", "time_band_high")
MAX_AGGREGATED = {"vram_allocated", "vram_reserved", "cpu_ram", "cpu_process_memory", "checkpoint", "disk"}
FACTOR_RANGE = (0.05, 20.0)  # outside it the two numbers measure different things; never a correction


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


def _row(component: str, measured, estimated, note: str = "") -> dict:
    label, unit = COMPONENTS[component]
    ratio = (measured / estimated) if (measured is not None and estimated) else None
    return {"component": component, "label": label, "unit": unit, "measured": measured, "estimated": estimated,
            "ratio": ratio, "error_pct": None if ratio is None else round((ratio - 1) * 100, 1), "note": note}


def _memory_rows(summary: dict, est: dict, device: str, world: int) -> list[dict]:
    rss = summary.get("peak_rss_bytes") or []
    if device == "cpu":
        return [_row("cpu_process_memory", max(rss) if rss else None, estimated_memory(est, "cpu", world),
                     "CPU run: the estimate's per-process peak (device = this CPU)")]
    alloc = summary.get("peak_allocated_bytes") or []
    reserved = summary.get("peak_reserved_bytes") or []
    return [_row("vram_allocated", max(alloc) if alloc else None, est.get("vram_allocated_per_gpu_bytes")),
            _row("vram_reserved", max(reserved) if reserved else None, est.get("vram_per_gpu_bytes")),
            _row("cpu_ram", sum(rss) if rss else None, est.get("cpu_ram_bytes"))]


def _disk_row(outputs_bytes: int, est: dict) -> dict:
    breakdown = est.get("disk_breakdown") or {}
    outputs = [v for k, v in breakdown.items()
               if any(w in k for w in ("checkpoint", "export", "adapter", "final", "projector"))]
    if outputs:
        return _row("disk", outputs_bytes, sum(outputs), "estimate: checkpoint and export parts of disk_bytes")
    return _row("disk", outputs_bytes, None, f"estimate gives only the total {est.get('disk_bytes')} B "
                                             "(with weights and dataset): not comparable")


def _time_row(summary: dict, plan: dict, est: dict, resumed_at: int) -> dict:
    steps, train_s, n_planned = summary.get("steps"), summary.get("train_seconds"), planned_steps(plan)
    if steps and resumed_at and steps > resumed_at:  # train_seconds covers the resumed process only
        steps -= resumed_at
    measured_step = (train_s / steps) if (steps and train_s is not None) else None
    est_step = (est["time_seconds"] / n_planned) if (est.get("time_seconds") and n_planned) else None
    return _row("time_per_step", measured_step, est_step, f"{steps} measured steps; estimate covers {n_planned}")


def compare(summary: dict, plan: dict | None, *, outputs_bytes: int | None = None, resumed_at: int = 0) -> list[dict]:
    """Rows of measured vs estimated for one finished attempt (`summary.json` + `plan.json`).

    `outputs_bytes`: checkpoints + final export as found on disk (None: no disk row); `resumed_at`: the
    step the last trainer process started from (its `train_seconds` covers only the steps after it).
    """
    plan = plan or {}
    est = summary.get("estimate") or plan.get("estimate") or {}
    device = summary.get("device") or (plan.get("hardware") or {}).get("device") or "cuda"
    world = int(summary.get("world_size") or (plan.get("hardware") or {}).get("total_gpus") or 1)
    rows = _memory_rows(summary, est, device, world)
    rows.append(_row("checkpoint", summary.get("checkpoint_bytes"), est.get("checkpoint_bytes")))
    if outputs_bytes is not None:
        rows.append(_disk_row(outputs_bytes, est))
    rows.append(_time_row(summary, plan, est, resumed_at))
    return rows


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
    out = {k: float(f"{(max(v) if k in MAX_AGGREGATED else statistics.median(v)):.4g}") for k, v in ratios.items()}
    out.update(time_band(ratios.get("time_per_step", [])))
    return out


def time_band(ratios: list[float]) -> dict[str, float]:
    """The machine's own band (docs/estimate.md#time): the spread of its runs' measured/estimated time around
    their median, at least +-SELF_SPREAD; it replaces the benchmark's band once the time is calibrated."""
    from vramplan.estimate.timing_band import SELF_SPREAD

    if not ratios:
        return {}
    med = statistics.median(ratios)
    lo, hi = min(ratios) / med, max(ratios) / med
    return {"time_band_low": float(f"{min(lo, 1 - SELF_SPREAD):.4g}"),
            "time_band_high": float(f"{max(hi, 1 + SELF_SPREAD):.4g}")}
