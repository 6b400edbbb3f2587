"""The training packages the plan needs, at minimum versions; bitsandbytes 4-bit on the device;
DeepSpeed and its CPU-Adam op for offload; a stale JIT-build lock; the ZeRO-3 + 4-bit version floor.

Versions come from package metadata (no import). Minimums are pyproject.toml's `train` extra. ZeRO-3 with
4-bit weights: PEFT docs `accelerate/deepspeed.md` require bitsandbytes>=0.43.3, accelerate>=1.0.1,
transformers>4.44.2, peft>0.13.0. CPU Adam (offload) is a DeepSpeed op that is
prebuilt (DS_BUILD_CPU_ADAM=1) or JIT-compiled on first use with ninja + a C++ compiler + Python headers
(DeepSpeed op_builder/cpu_adam.py; ~28 s measured on 2 cores, cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import re
import shlex
from importlib import metadata

from vramplan.estimate.types import offloads_optimizer
from vramplan.preflight.base import CheckResult, Context

MINIMUMS = {"torch": "2.4", "transformers": "4.46", "accelerate": "1.0", "peft": "0.13", "bitsandbytes": "0.45",
            "deepspeed": "0.15", "safetensors": "0.4", "tokenizers": "0.20", "pillow": "10"}
# (package, operator, version) - PEFT docs, DeepSpeed ZeRO-3 + QLoRA
ZERO3_4BIT = (("bitsandbytes", ">=", "0.43.3"), ("accelerate", ">=", "1.0.1"), ("transformers", ">", "4.44.2"),
              ("peft", ">", "0.13.0"))


def parse_version(v: str):
    try:
        from packaging.version import Version

        return Version(v)
    except Exception:  # noqa: BLE001 - packaging missing or an odd version string
        return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4])


def satisfies(have: str, op: str, want: str) -> bool:
    h, w = parse_version(have), parse_version(want)
    if type(h) is not type(w):
        h, w = parse_version(re.sub(r"[^\d.].*$", "", have)), parse_version(want)
    return h >= w if op == ">=" else h > w


def installed_version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def required_packages(ctx: Context) -> tuple[list[str], list[str]]:
    """(required, optional) for this plan; without a plan the default QLoRA recipe's set is optional-ish."""
    base = ["torch", "transformers", "accelerate", "safetensors", "tokenizers", "pillow"]
    if ctx.plan is None:
        return base + ["peft"], ["bitsandbytes", "deepspeed"]
    r = ctx.section("recipe")
    req = list(base)
    if r.get("llm_lora") or r.get("vision_lora") or r.get("name") in ("qlora", "lora"):
        req.append("peft")
    opt = []
    (req if ctx.quant in ("nf4", "int8") else opt).append("bitsandbytes")
    (req if ctx.uses_deepspeed else opt).append("deepspeed")
    return req, opt


def check_packages(ctx: Context) -> CheckResult:
    req, opt = required_packages(ctx)
    found, missing, old, opt_missing = [], [], [], []
    for pkg in req + opt:
        v = installed_version(pkg)
        if v is None:
            (missing if pkg in req else opt_missing).append(pkg)
            continue
        found.append(f"{pkg} {v}")
        if not satisfies(v, ">=", MINIMUMS[pkg]):
            old.append(f"{pkg} {v} < {MINIMUMS[pkg]}")
    facts = {"required": req, "optional": opt, "found": found, "missing": missing, "too_old": old,
             "optional_missing": opt_missing}
    spec = " ".join(f"'{p}>={MINIMUMS[p]}'" for p in missing + [o.split()[0] for o in old])
    fix = f"pip install -c constraints.txt {spec}   # constraints.txt pins torch so no CUDA torch is pulled" if spec \
        else ""
    if missing or old:
        return CheckResult("packages", "FAIL", "; ".join(filter(None, [
            f"missing: {', '.join(missing)}" if missing else "", f"too old: {', '.join(old)}" if old else "",
            f"found: {', '.join(found)}"])), fix, facts)
    if opt_missing and ctx.plan is None:
        return CheckResult("packages", "WARN", f"{', '.join(opt_missing)} not installed (the default QLoRA/ZeRO plans "
                                               f"need them); found: {', '.join(found)}",
                           "pip install -c constraints.txt " + " ".join(f"'{p}>={MINIMUMS[p]}'" for p in opt_missing),
                           facts)
    extra = f"; not needed by this plan and not installed: {', '.join(opt_missing)}" if opt_missing else ""
    return CheckResult("packages", "PASS", f"all at minimum versions: {', '.join(found)}{extra}", "", facts)


def check_zero3_qlora(ctx: Context) -> CheckResult:
    name = "zero3-qlora"
    if ctx.plan is None:
        return CheckResult(name, "SKIP", f"{ctx.need_note()}: applies only to ZeRO-3 with 4-bit weights")
    if ctx.zero_stage != 3 or ctx.quant not in ("nf4", "int8"):
        return CheckResult(name, "SKIP", f"the plan is ZeRO-{ctx.zero_stage or 0} with quant {ctx.quant or 'none'}; "
                                         f"applies only to ZeRO-3 with 4-bit weights")
    if ctx.quant == "int8":
        return CheckResult(name, "WARN", "ZeRO-3 with 8-bit weights: PEFT documents ZeRO-3 only for 4-bit (NF4) "
                                         "weights", "vramplan estimate --quant nf4 ... --save-plan plan.json")
    bad, have = [], []
    for pkg, op, want in ZERO3_4BIT:
        v = installed_version(pkg)
        have.append(f"{pkg} {v or 'missing'}")
        if v is None or not satisfies(v, op, want):
            bad.append(f"{pkg} {v or 'missing'} (needs {op}{want})")
    facts = {"installed": have}
    if bad:
        return CheckResult(name, "FAIL", f"ZeRO-3 + 4-bit needs newer packages: {', '.join(bad)}",
                           "pip install -c constraints.txt " + " ".join(f"'{p}{o}{w}'" for p, o, w in ZERO3_4BIT)
                           + "\n# or: vramplan estimate --zero 2 ...   (ZeRO-2 works with older versions)", facts)
    return CheckResult(name, "PASS", f"versions support ZeRO-3 with 4-bit weights ({', '.join(have)}); the trainer "
                                     f"sets bnb_4bit_quant_storage to the compute dtype", "", facts)


def _accel_step(ctx: Context, key: str) -> tuple[dict | None, str]:
    res = ctx.probes.get("accel") if ctx.probes else None
    if res is None:
        return None, "the probe did not run"
    st = res.step(key)
    return st, "" if st is not None else (res.died() or "the probe reported nothing")


def check_bitsandbytes(ctx: Context) -> CheckResult:
    name = "bitsandbytes"
    needed = ctx.quant in ("nf4", "int8") if ctx.plan is not None else None
    st, why = _accel_step(ctx, "bitsandbytes")
    bad = "FAIL" if needed else "WARN"
    ctx_txt = "the plan quantizes the LLM" if needed else "the default QLoRA recipe needs it"
    if needed is False:
        v = installed_version("bitsandbytes")
        return CheckResult(name, "SKIP", f"the plan does not quantize (quant {ctx.quant}); bitsandbytes "
                                         f"{v or 'not installed'}")
    if st is None:
        return CheckResult(
            name, bad, f"probing bitsandbytes failed: {why}", "python -m bitsandbytes   # its own report"
        )
    if st.get("ok") and not st.get("installed"):
        return CheckResult(name, bad, f"bitsandbytes is not installed; {ctx_txt}",
                           f"pip install -c constraints.txt 'bitsandbytes>={MINIMUMS['bitsandbytes']}'", st)
    device = st.get("device") or ctx.cache.get("probe_device") or "?"
    if st.get("device_unavailable"):
        return CheckResult(
            name,
            "SKIP",
            f"bitsandbytes {st.get('version')} is installed, but NF4 on {device} cannot be "
            f"tested here: {st['device_unavailable']} (see 'accelerators')",
            "",
            st,
        )
    if not st.get("ok"):
        hint = ("bitsandbytes has no official Ascend build: plan bf16 LoRA instead (vramplan estimate --quant none)"
                if device == "npu" else "python -m bitsandbytes   # its diagnostics\n"
                                        "pip install -U -c constraints.txt bitsandbytes")
        return CheckResult(name, bad, f"bitsandbytes cannot do NF4 4-bit on {device}: {st.get('error')}; {ctx_txt}",
                           hint, st)
    return CheckResult(name, "PASS", f"bitsandbytes {st.get('version')}: an NF4 Linear4bit forward on {device} works "
                                     f"(max |error| vs fp32 {st.get('max_abs_error', 0):.3f})", "", st)


def check_deepspeed(ctx: Context) -> CheckResult:
    name = "deepspeed"
    uses = ctx.uses_deepspeed
    if uses is False:
        v = installed_version("deepspeed")
        return CheckResult(name, "SKIP", f"the plan does not use DeepSpeed (ZeRO-{ctx.zero_stage or 0}, no ds_config); "
                                         f"deepspeed {v or 'not installed'}")
    st, why = _accel_step(ctx, "deepspeed")
    bad = "FAIL" if uses else "WARN"
    if st is None:
        return CheckResult(name, bad, f"probing deepspeed failed: {why}", "ds_report   # DeepSpeed's own report")
    if st.get("ok") and not st.get("installed"):
        return CheckResult(name, bad, "deepspeed is not installed" + ("; the plan uses ZeRO" if uses else
                                                                      "; ZeRO plans need it"),
                           f"DS_BUILD_OPS=0 pip install -c constraints.txt 'deepspeed>={MINIMUMS['deepspeed']}'", st)
    if not st.get("ok"):
        return CheckResult(name, bad, f"import deepspeed fails: {st.get('error')}",
                           "pip install --force-reinstall -c constraints.txt deepspeed", st)
    acc = st.get("accelerator")
    found = f"deepspeed {st.get('version')}, accelerator {acc}"
    if uses and ctx.device in ("cuda", "npu") and acc and acc != ctx.device:
        if _device_present(ctx, ctx.device):
            return CheckResult(name, "FAIL", f"{found}, but the plan runs on {ctx.device}",
                               f"export DS_ACCELERATOR={ctx.device}", st)
        found += f" (no {ctx.device} device here, see 'accelerators'; on the training machine it picks {ctx.device})"
    res = _ops_result(ctx, name, found, st)
    lock = build_lock_result(name, found, st, bool(uses))
    return lock if lock and (res.status != "FAIL" or lock.status == "FAIL") else res


def _ops_result(ctx: Context, name: str, found: str, st: dict) -> CheckResult:
    offload = ctx.offload if ctx.plan is not None else None
    cpu_adam, missing = _cpu_adam(st)
    if offloads_optimizer(offload):
        if missing:
            return CheckResult(name, "FAIL", f"{found}; the plan offloads ({offload}) and needs the CPU Adam op, which "
                                             f"cannot be built here: {'; '.join(missing)}", _cpu_adam_fix(st), st)
        return CheckResult(name, "PASS", f"{found}; CPU Adam for offload: {cpu_adam}", "", st)
    if ctx.plan is None and missing:
        return CheckResult(name, "WARN", f"{found}; CPU Adam (needed by offload plans) cannot be built here: "
                                         f"{'; '.join(missing)}", _cpu_adam_fix(st), st)
    return CheckResult(name, "PASS", f"{found}; CPU Adam (offload plans): {cpu_adam}", "", st)


STALE_LOCK_S = 600  # a DeepSpeed op's JIT build takes 0.5-3 min (CPU Adam ~28 s on 2 cores): 10 min is no live build


def build_lock_result(name: str, found: str, st: dict, uses: bool) -> CheckResult | None:
    """torch's FileBaton `lock` files in the extensions dir (the probe lists them with their age). A JIT build
    killed mid-way (Ctrl-C, the OOM killer, scancel) leaves its lock, and every later build of that op waits for
    the file to vanish, forever, after printing 'Using ... as PyTorch extensions root' (torch/utils/
    cpp_extension.py _jit_compile, file_baton.py FileBaton.wait; pytorch/pytorch#189245). None: no lock."""
    locks = st.get("build_locks") or []
    if not locks or not st.get("baton_locks", True):
        return None
    path, age = locks[0]
    more = f" (+{len(locks) - 1} more)" if len(locks) > 1 else ""
    rm = "rm -f " + " ".join(shlex.quote(p) for p, _ in locks)
    if age >= STALE_LOCK_S:
        return CheckResult(name, "FAIL" if uses else "WARN",
                           f"{found}; {path}{more} is the lock of a JIT op build killed {age // 60} min ago: torch "
                           "waits for it to vanish before building that op again, forever (the launch would hang "
                           "after 'Using ... as PyTorch extensions root')",
                           f"{rm}   # no build is running; the next one starts clean", st)
    return CheckResult(name, "WARN", f"{found}; an op build holds {path}{more} (written {age} s ago): another process "
                                     "is JIT-building a DeepSpeed op now, or one was just killed",
                       f"wait for it to finish; if no build is running: {rm}", st)


def _device_present(ctx: Context, device: str) -> bool:
    if device == "cuda":
        from vramplan.preflight.accelerators import _nvml

        return bool(_nvml(ctx).gpus)
    from vramplan.preflight.ascend import npu_state

    return npu_state(ctx).count > 0


def _cpu_adam(st: dict) -> tuple[str, list[str]]:
    if st.get("cpu_adam_prebuilt"):
        return "prebuilt in the installed wheel", []
    if st.get("cpu_adam_jit_cached"):
        return f"already JIT-built ({st['cpu_adam_jit_cached'][0]})", []
    missing = []
    if not st.get("cpu_adam_compatible"):
        missing.append("the op builder says it is incompatible" + (f" ({st['cpu_adam_error']})"
                                                                   if st.get("cpu_adam_error") else ""))
    if not st.get("ninja"):
        missing.append("ninja is missing")
    if not st.get("compiler"):
        missing.append("no C++ compiler (c++/g++/clang++)")
    if not st.get("python_headers"):
        missing.append(f"no Python.h in {st.get('python_include')}")
    return f"will be JIT-compiled on first use (~30 s, cached in {st.get('extensions_dir')})", missing


def _cpu_adam_fix(st: dict) -> str:
    lines = []
    if not st.get("ninja"):
        lines.append("pip install ninja")
    if not st.get("compiler") or not st.get("python_headers"):
        lines.append("apt-get install -y build-essential python3-dev   # compiler + Python headers")
    lines.append("DS_BUILD_CPU_ADAM=1 pip install --no-cache-dir --force-reinstall -c constraints.txt deepspeed"
                 "   # or prebuild the op")
    return "\n".join(lines)
