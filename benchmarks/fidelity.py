"""Hold vramplan's memory estimate against published measurements (benchmarks/cases/measured_cases.json).

    python benchmarks/fidelity.py                 # per-case table + summary on stdout
    python benchmarks/fidelity.py --write         # also writes benchmarks/results/fidelity.txt
    python benchmarks/fidelity.py --traced --write  # + the cases only the traced path expresses (real-size
                                                    # traces: minutes each, then cached): fidelity_traced.txt

Every case is expressed through the public estimate API (vramplan.plan.service: run_estimate /
run_inference_estimate with EstimateOptions, i.e. the `vramplan estimate` flags) as listed in
benchmarks/fidelity_cases.py, or marked with the capability vramplan lacks. Like is compared with like:
the statistic the source measured (allocated, reserved, nvidia-smi), in its unit (GB or GiB), per GPU
(totals over GPUs are divided). The verdict compares the source's outcome (ran / ran out of memory) with
whether the estimate fits the card (headroom 0). docs/estimate.md#checked-against-reality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fidelity_cases import CASES  # noqa: E402

from vramplan.errors import UsageError  # noqa: E402
from vramplan.plan.request import EstimateOptions  # noqa: E402
from vramplan.plan.resolve import PINNED_BNB  # noqa: E402
from vramplan.plan.service import run_estimate, run_inference_estimate  # noqa: E402

GiB = 2**30
SPEC_KEYS = {"missing", "stat", "unit", "per", "verdict_only", "value_key", "note", "any_micro_batch", "any_stage",
             "world_gpus", "traced"}
TRACED_WHY = "the traced path only (benchmarks/fidelity.py --traced; docs/estimate.md#the-traced-path)"
OPTION_NAMES = {f.name for f in fields(EstimateOptions)}


def load_cases() -> list[dict]:
    return json.loads((ROOT / "benchmarks/cases/measured_cases.json").read_text())


def measured_gib(case: dict, spec: dict) -> float | None:
    """The case's figure per GPU in GiB, in the statistic named by spec['stat']."""
    mem = case.get("memory") or {}
    if spec.get("value_key"):
        v = mem.get(spec["value_key"])
        return None if v is None else v / GiB
    v = mem.get("value")
    if not isinstance(v, (int, float)):
        return None
    gib = v * (1e9 / GiB if spec.get("unit") == "GB" else 1.0)
    return gib / case["num_gpus"] if spec.get("per") == "total" else gib


def options_for(spec: dict) -> tuple[dict, list[str]]:
    """EstimateOptions kwargs of a case; flags this version of vramplan lacks are left out and named."""
    kw, dropped = {}, []
    for k, v in spec.items():
        if k in SPEC_KEYS or v is None:
            continue
        if k not in OPTION_NAMES:
            dropped.append(f"{k}={v}")
            continue
        kw[k] = v
    kw["headroom"] = 0.0
    if kw.get("recipe") == "qlora":
        kw.setdefault("bnb_version", PINNED_BNB)  # not the installed one: the figures must not follow the host
    if kw.get("zero") == "none":
        try:
            EstimateOptions(zero="none")
        except UsageError:
            dropped.append("zero=none (no plain-PyTorch strategy: ZeRO-0 used)")
            kw["zero"] = 0
    return kw, dropped


def _train(spec: dict, kw: dict, n: int):
    res = run_estimate(EstimateOptions(**kw))
    plain = "torch" if kw.get("zero") == "none" else None
    zero = None if plain or spec.get("any_stage") else kw.get("zero")
    match = [c for c in res.candidates if c.strategy.gpus == n
             and (zero is None or c.strategy.zero_stage == zero)
             and (plain is None or getattr(c.strategy, "engine", "torch") == plain)]
    if not match:
        return None, None, "no candidate"
    fits = any(c.fits for c in match)
    c = match[0]
    if not (spec.get("any_micro_batch") or spec.get("any_stage")) and len(match) != 1:
        return None, None, f"{len(match)} candidates match"
    stat = spec.get("stat", "smi")
    est = {"allocated": c.vram_allocated_per_gpu_bytes,
           "reserved": c.vram_allocated_per_gpu_bytes + c.vram_breakdown.get("allocator_reserve", 0),
           "smi": c.vram_per_gpu_bytes}[stat]
    return est / GiB, fits, c.peak_phase


def _infer(spec: dict, kw: dict, n: int):
    data = run_inference_estimate(EstimateOptions(**kw))
    want = {"none": ("bf16", "fp16"), "nf4": ("nf4",), "int8": ("int8",)}[kw.get("quant", "none")]
    match = [c for c in data["candidates"] if c["gpus"] == n and c.get("dtype") in want]
    if not match:
        return None, None, "no candidate"
    c = match[0]
    stat = spec.get("stat", "smi")
    est = {"allocated": c["vram_allocated_per_gpu_bytes"],
           "reserved": c["vram_allocated_per_gpu_bytes"] + c["vram_breakdown"].get("allocator_reserve", 0),
           "smi": c["vram_per_gpu_bytes"]}[stat]
    return est / GiB, c["fits"], "inference"


def score_case(case: dict, traced: bool = False) -> dict:
    spec = CASES.get(case["id"], {"missing": "not yet expressed"})
    if spec.get("traced") and not traced:  # a real-size trace per case: not in the CI tests
        spec = {"missing": TRACED_WHY}
    row = {"id": case["id"], "model": case["model"][:34], "method": case["method"][:10],
           "outcome": "OOM" if "OOM" in str(case.get("outcome")) else "fits"}
    if "missing" in spec:
        return {**row, "expressed": False, "why": spec["missing"]}
    kw, dropped = options_for(spec)
    n = spec.get("world_gpus", case["num_gpus"])  # the GPUs one training job (one DeepSpeed world) spans
    try:
        est, fits, phase = (_infer if kw.get("task") == "infer" else _train)(spec, kw, n)
    except UsageError as e:
        return {**row, "expressed": False, "why": f"estimate refused it: {e}"}
    meas = None if spec.get("verdict_only") else measured_gib(case, spec)
    err = None if (meas is None or est is None) else (est - meas) / meas
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kw.items() if k != "headroom")
    return {**row, "expressed": est is not None or fits is not None, "flags": flags, "dropped": dropped,
            "stat": None if meas is None else spec.get("stat", "smi"), "measured_gib": meas, "estimate_gib": est,
            "error": err, "predicted": None if fits is None else ("fits" if fits else "OOM"), "phase": phase,
            "group": "full" if case["method"].startswith("full") else
            ("inference" if kw.get("task") == "infer" else "lora/qlora")}


def summarize(rows: list[dict]) -> dict:
    ex = [r for r in rows if r.get("expressed")]
    verd = [r for r in ex if r.get("predicted")]
    out = {"cases": len(rows), "expressed": len(ex),
           "verdicts": len(verd), "verdicts_agree": sum(r["predicted"] == r["outcome"] for r in verd),
           "oom_predicted_fit": [r["id"] for r in verd if r["outcome"] == "OOM" and r["predicted"] == "fits"]}
    for g in ("lora/qlora+inference", "full", "all"):
        errs = [abs(r["error"]) for r in ex if r.get("error") is not None
                and (g == "all" or r["group"] == g or (g.startswith("lora") and r["group"] != "full"))]
        out[g] = {"n": len(errs), "median_abs_error": statistics.median(errs) if errs else None,
                  "within_10": sum(e <= 0.10 for e in errs) / len(errs) if errs else None,
                  "within_15": sum(e <= 0.15 for e in errs) / len(errs) if errs else None}
    return out


def render(rows: list[dict], s: dict) -> str:
    lines = [f"{'id':5} {'method':10} {'stat':9} {'measured':>9} {'estimate':>9} {'error':>7} {'real':>5} "
             f"{'said':>5}  model / why not / flags"]
    for r in rows:
        if not r.get("expressed"):
            lines.append(f"{r['id']:5} {r['method']:10} {'-':9} {'':>9} {'':>9} {'':>7} {r['outcome']:>5} "
                         f"{'-':>5}  {r['model']}: NOT EXPRESSIBLE: {r['why']}")
            continue
        m = "" if r["measured_gib"] is None else f"{r['measured_gib']:.2f}"
        e = "" if r["estimate_gib"] is None else f"{r['estimate_gib']:.2f}"
        err = "" if r["error"] is None else f"{r['error']:+.1%}"
        mark = " !" if r["predicted"] and r["predicted"] != r["outcome"] else ""
        lines.append(f"{r['id']:5} {r['method']:10} {r['stat'] or 'verdict':9} {m:>9} {e:>9} {err:>7} "
                     f"{r['outcome']:>5} {r['predicted'] or '-':>5}{mark}  {r['model']}: {r['flags']}"
                     + (f" [not in this version: {', '.join(r['dropped'])}]" if r["dropped"] else ""))
    lines += ["", "GiB per GPU; error = (estimate - measured) / measured; '!' = verdict disagrees", "",
              "| group | cases with a figure | median abs error | within 10% | within 15% |", "|---|---|---|---|---|"]
    for g in ("lora/qlora+inference", "full", "all"):
        d = s[g]
        if d["n"]:
            lines.append(f"| {g} | {d['n']} | {d['median_abs_error']:.1%} | {d['within_10']:.1%} | "
                         f"{d['within_15']:.1%} |")
    lines += [f"| verdicts (fits/OOM) | {s['verdicts']} | agree {s['verdicts_agree']}/{s['verdicts']} "
              f"({s['verdicts_agree'] / max(1, s['verdicts']):.0%}) | OOM predicted to fit: "
              f"{', '.join(s['oom_predicted_fit']) or 'none'} | |",
              f"| expressible | {s['expressed']} of {s['cases']} cases | | | |"]
    return "\n".join(lines)


def run(traced: bool = False) -> tuple[list[dict], dict]:
    rows = [score_case(c, traced) for c in load_cases()]
    return rows, summarize(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write benchmarks/results/fidelity.txt")
    ap.add_argument("--json", action="store_true", help="print the rows and summary as JSON")
    ap.add_argument("--traced", action="store_true", help="score the cases of the traced path too")
    a = ap.parse_args(argv)
    rows, s = run(a.traced)
    text = render(rows, s)
    print(json.dumps({"rows": rows, "summary": s}, indent=1) if a.json else text)
    if a.write:
        out = ROOT / ("benchmarks/results/fidelity_traced.txt" if a.traced else "benchmarks/results/fidelity.txt")
        out.write_text(f"$ python benchmarks/fidelity.py{' --traced' if a.traced else ''} --write\n\n" + text + "\n")
        print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
