"""The honest band around a time figure (docs/estimate.md#time).

The time model is checked against published throughputs (benchmarks/time_fidelity.py over
benchmarks/cases/measured_cases.json). The measured / estimated time ratios of the cases in the same regime
give the band: a figure T is printed as "T, likely T x low - T x high", low and high being the 10th and 90th
percentiles of those ratios. The regimes split by tokens per micro-batch (below 1,000 the per-layer host cost and
the weight reads dominate; above, the FLOPs) and decoding. `vramplan calibrate` replaces the band with the spread
of a machine's own runs (calibration_math.py).
"""

from __future__ import annotations

SHORT_TOKENS = 1000  # tokens per micro-batch below which a step is launch/bandwidth-bound

# regime -> (p10, p50, p90 of measured/estimated time, cases); the numbers are the output of
# `python benchmarks/time_fidelity.py` recorded in benchmarks/results/time_fidelity.txt (tests pin them)
BANDS = {
    "train_short": (0.87, 0.97, 1.45, 12),
    "train_long": (0.74, 0.95, 1.36, 35),
    "decode": (0.86, 0.96, 1.26, 12),
}
BAND_SOURCE = "benchmarks/results/time_fidelity.txt; docs/estimate.md#time"
SELF_SPREAD = 0.10  # a machine's own runs: at least +-10% (run-to-run variation: data order, clocks, other jobs)


def training_regime(tokens_per_micro_batch: int) -> str:
    return "train_short" if tokens_per_micro_batch < SHORT_TOKENS else "train_long"


def band(seconds: float, regime: str, calibration: dict | None = None) -> dict:
    """{"low_s", "high_s", "regime", "source"}: the range the time likely falls in.

    With a calibration (its `time_band_low` / `time_band_high` factors from the machine's own runs, applied after
    its `time_per_step` factor) the machine's spread replaces the benchmark's."""
    cal = calibration or {}
    if "time_band_low" in cal and "time_band_high" in cal:
        lo, hi = cal["time_band_low"], cal["time_band_high"]
        src = "this machine's runs (vramplan calibrate)"
    else:
        lo, _, hi, _ = BANDS.get(regime, BANDS["train_long"])
        src = f"{regime}: 10th-90th percentile of measured/estimated time over the published cases, {BAND_SOURCE}"
    return {"low_s": seconds * lo, "high_s": seconds * hi, "regime": regime, "source": src}
