"""Benchmark: vramplan's time model against the published throughputs (benchmarks/cases/measured_cases.json).

    python benchmarks/time_fidelity.py                 # per-case table, ratios, summary, band quantiles
    python benchmarks/time_fidelity.py --json OUT      # the rows as JSON too

Every case with a `throughput_or_time` is listed: its figure converted to tokens/s per GPU (the conversion is
printed per case, benchmarks/time_cases.py), the same run expressed in vramplan's terms and estimated, and the
ratio estimated time / measured time (= measured tokens/s / estimated tokens/s; > 1: vramplan is too slow).
Cases vramplan cannot express say why. `--before FILE` adds the figures of an earlier model (a JSON of this
script) as a column. Results: benchmarks/results/time_fidelity.txt; summary in docs/estimate.md#time.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_cases import ARCH, DECODE, MOE, QWEN_VL_VISION, TRAIN

from vramplan.contract import LoraSpec
from vramplan.estimate.families.clip import VisionSpec
from vramplan.estimate.families.llama import TextSpec
from vramplan.estimate.families.llava import ProjectorSpec
from vramplan.estimate.param_groups import param_groups
from vramplan.estimate.params import count_params
from vramplan.estimate.specs import ModelSpec, RecipeSpec
from vramplan.estimate.timing import estimate_time
from vramplan.estimate.types import Strategy
from vramplan.inputs.model_dir import load_model_dir
from vramplan.inputs.profiles import load_hardware, load_model

# AWS's A10G has no NVIDIA datasheet and no shipped profile: the A10 profile (same GA102, 24 GB, 600 GB/s) with the
# A10G's tensor rate and SMs as tabulated by Baseten ("NVIDIA A10 vs A10G for ML model inference": 70 TFLOPS FP16
# tensor, 80 SMs)
A10G = {"bf16_tflops": 70.0, "fp16_tflops": 70.0, "sm_count": 80, "display_name": "NVIDIA A10G"}


def hardware(hid: str):
    if hid == "a10g":
        return replace(load_hardware("a10"), **{k: v for k, v in A10G.items() if k in _fields()})
    return load_hardware(hid)


def _fields() -> set:
    from vramplan.estimate.specs import HardwareSpec

    return set(HardwareSpec.__dataclass_fields__)


def model_spec(arch: str, vision: str | None = None) -> ModelSpec:
    if arch.startswith("llava"):
        return load_model(arch)
    if arch in MOE:  # its config.json, with the expert layout of the run's transformers
        spec = load_model_dir(Path(__file__).resolve().parent / "cases/models" / arch)
        return replace(spec, text=replace(spec.text, fused_experts=MOE[arch]))
    L, h, i, a, kv, V, tied, bias = ARCH[arch]
    text = TextSpec(L, h, i, a, kv, V, tie_word_embeddings=tied, attention_bias=bias)
    vis = proj = None
    if vision == "qwen-vl":
        vL, vh, vi, va, img, patch = QWEN_VL_VISION
        vis = VisionSpec(vL, vh, vi, va, img, patch)
        proj = ProjectorSpec("mlp2x_gelu", vh, h)
    return ModelSpec(arch, "benchmarks/time_cases.py", text, vis, proj)


def recipe(method: str, targets, r: int, quant: str, double_quant: bool = True, projector: bool = False):
    lora = LoraSpec(r, 2 * r, 0.05, tuple(targets)) if targets else None
    return RecipeSpec(name=method, source="benchmarks/time_cases.py", description="", quant=quant,
                      double_quant=double_quant, compute_dtype="bf16", llm_lora=lora, vision_lora=None,
                      train_projector=projector, train_llm_full=method == "full", learning_rate=1e-4, epochs=1,
                      micro_batch=1, global_batch=1, max_length=2048, text_tokens=2048, gradient_checkpointing=True,
                      save_steps=1, keep_checkpoints=1)


def _call(fn, **kw):
    """Call with the keywords `fn` accepts (the same script runs against an older vramplan for --before)."""
    accepted = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kw.items() if k in accepted})


def train_row(case: dict) -> dict:
    row = {"id": case["id"], "kind": "train", "measured": case["per_gpu"], "conversion": case["conversion"],
           "tokens_per_micro_batch": case["mb"] * case["seq"]}
    if case["skip"]:
        return {**row, "skip": case["skip"]}
    model = model_spec(case["arch"], case["vision"])
    hw = hardware(case["hw"])
    quant = "nf4" if case["method"] == "qlora" else "none"
    targets = case["lora"] if case["method"] != "full" else None
    rec = recipe(case["method"], targets, case["r"], quant, projector=case["arch"].startswith("llava"))
    g = param_groups(model, rec)
    n = case["gpus"]
    s = Strategy(case["zero"], case["offload"], n, max(1, -(-n // 8)), case["mb"], case["accum"], case["gc"])
    t = _call(estimate_time, model=model, hw=hw, g=g, s=s, seq=case["seq"], images=case["images"],
              samples=s.global_batch, epochs=1, quant=quant, compute_dtype="bf16", vision_trainable=False,
              device="cuda", lora=rec.llm_lora, compiled=case["compiled"])
    est = t.tokens_per_s / n
    terms = getattr(t, "terms", {}) or {}
    top = max(terms, key=terms.get) if terms else ""
    return {**row, "estimated": est, "ratio": case["per_gpu"] / est, "dominant": top}


def decode_row(d: tuple) -> dict:
    cid, arch, hwid, dtype, kernel, _gpus, context, measured, conversion, stack = d
    row = {"id": cid, "kind": "decode", "measured": measured, "conversion": conversion, "dtype": dtype}
    model = model_spec(arch)
    hw = hardware(hwid)
    c = count_params(model)
    if dtype == "bf16":
        wbytes = c.total * 2
    else:
        g = param_groups(model, recipe("qlora", None, 8, "nf4", double_quant=True))
        wbytes = g.quantized_bytes + (c.total - g.quantized_params) * 2
    try:
        from vramplan.estimate.inference_time import decode_terms, prefill_seconds
    except ImportError:  # the model before issue #13: (weights + KV cache) / (bandwidth x 0.6)
        kv = 2 * model.text.kv_dim * 2 * context * model.text.num_layers
        step = (wbytes + kv) / (hw.hbm_bandwidth_gbps * 1e9 * 0.6)
        return {**row, "estimated": 1 / step, "ratio": measured * step}
    terms = decode_terms(model, hw, weight_bytes=wbytes, context=context, batch=1, act_bytes=2,
                         kernel="bnb" if (dtype != "bf16" and kernel == "bnb") else ("gptq" if kernel else ""))
    prompt = max(1, context - 1024) if context > 1024 else 6
    new = 2048 if stack == "hf" else 50
    total = prefill_seconds(model, hw, context=prompt, batch=1, compute_dtype="bf16") + new * sum(terms.values())
    est = new / total
    return {**row, "estimated": est, "ratio": measured / est, "dominant": max(terms, key=terms.get)}


def within(rows: list[dict], k: float) -> float:
    ok = [r for r in rows if max(r["ratio"], 1 / r["ratio"]) <= k]
    return len(ok) / len(rows) if rows else 0.0


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(rows: list[dict]) -> dict:
    out = {}
    for kind in ("train", "decode"):
        rs = [r for r in rows if r["kind"] == kind and "ratio" in r]
        if rs:
            out[kind] = {"rows": len(rs), "within_1.25": within(rs, 1.25), "within_1.5": within(rs, 1.5),
                         "within_2": within(rs, 2.0), "median_ratio": statistics.median(r["ratio"] for r in rs),
                         "skipped": sum(1 for r in rows if r["kind"] == kind and "skip" in r)}
    return out


def bands(rows: list[dict]) -> dict:
    """Regime -> (p10, p50, p90, cases) of measured / estimated time: vramplan/estimate/timing_band.py BANDS."""
    try:
        from vramplan.estimate.timing_band import SHORT_TOKENS
    except ImportError:  # an older vramplan (--before)
        SHORT_TOKENS = 1000
    groups = {"train_short": [], "train_long": [], "decode": []}
    for r in rows:
        if "ratio" not in r:
            continue
        key = "decode" if r["kind"] == "decode" else (
            "train_short" if r["tokens_per_micro_batch"] < SHORT_TOKENS else "train_long")
        groups[key].append(1 / r["ratio"])  # measured time / estimated time
    return {k: tuple(round(quantile(v, q), 2) for q in (0.1, 0.5, 0.9)) + (len(v),) for k, v in groups.items() if v}


def rows() -> list[dict]:
    return [train_row(c) for c in TRAIN] + [decode_row(d) for d in DECODE]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows and the summary as JSON")
    ap.add_argument("--before", help="a --json output of an earlier model, shown beside")
    a = ap.parse_args(argv)
    rs = rows()
    before = {}
    if a.before:
        before = {r["id"]: r for r in json.loads(Path(a.before).read_text())["rows"]}
    print(f"{'case':5} {'kind':6} {'measured':>9} {'estimated':>9} {'ratio':>6} {'before':>6}  dominant / conversion")
    for r in rs:
        b = before.get(r["id"], {}).get("ratio")
        bs = f"{b:6.2f}" if b else "     -"
        if "skip" in r:
            print(f"{r['id']:5} {r['kind']:6} {r['measured']:9.1f} {'-':>9} {'-':>6} {bs}  not expressed: {r['skip']}")
            continue
        print(f"{r['id']:5} {r['kind']:6} {r['measured']:9.1f} {r['estimated']:9.1f} {r['ratio']:6.2f} {bs}  "
              f"{r.get('dominant', '')}; {r['conversion']}")
    print("\nratio = estimated time / measured time (tokens/s per GPU measured / estimated); >1 = estimate too slow")
    summ = summary(rs)
    for kind, s in summ.items():
        line = (f"{kind}: {s['rows']} rows ({s['skipped']} not expressed): within x1.25 {s['within_1.25']:.0%}, "
                f"x1.5 {s['within_1.5']:.0%}, x2 {s['within_2']:.0%}; median ratio {s['median_ratio']:.2f}")
        print(line)
    if before:
        bsum = summary(list(before.values()))
        for kind, s in bsum.items():
            print(f"before {kind}: within x1.25 {s['within_1.25']:.0%}, x1.5 {s['within_1.5']:.0%}, "
                  f"x2 {s['within_2']:.0%}; median ratio {s['median_ratio']:.2f}")
    print("bands (p10, p50, p90, cases):", bands(rs))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rs, "summary": summ, "bands": bands(rs)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
