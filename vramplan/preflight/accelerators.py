"""NVIDIA GPUs (read by vramplan/inputs/devices.py through NVML) and the accelerator summary vs the plan.

bf16 needs compute capability 8.0+ (Ampere; torch.cuda.is_bf16_supported). A CUDA build of torch runs
on a driver whose CUDA version has the same major and is not older in minor only through CUDA's minor
version compatibility (CUDA Compatibility guide, "Minor Version Compatibility"): an older major fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from vramplan.inputs import devices
from vramplan.inputs.devices import Gpu, NvmlSnapshot
from vramplan.preflight import ascend
from vramplan.preflight.base import CheckResult, Context
from vramplan.units import fmt_bytes


def visible_gpus(gpus: tuple[Gpu, ...], env: Mapping[str, str]) -> tuple[list[Gpu], str]:
    """GPUs CUDA will show under CUDA_VISIBLE_DEVICES (indices or GPU-UUID prefixes; CUDA stops at the
    first invalid entry), and a note on what the variable did."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(gpus), ""
    out: list[Gpu] = []
    for tok in (t.strip() for t in raw.split(",")):
        if not tok:
            break
        match = None
        if tok.lstrip("-").isdigit():
            i = int(tok)
            match = next((g for g in gpus if g.index == i), None) if i >= 0 else None
        elif tok.startswith("GPU-"):
            match = next((g for g in gpus if g.uuid.startswith(tok)), None)
        if match is None or match in out:
            break
        out.append(match)
    return out, f"CUDA_VISIBLE_DEVICES={raw!r} shows {len(out)} of {len(gpus)}"


def _nvml(ctx: Context) -> NvmlSnapshot:
    """The NVML snapshot, read once per preflight. Only a complete read is checked: the GPUs read before an
    NVML error are dropped, so a failed read counts as no GPU."""
    if "nvml" not in ctx.cache:
        snap = devices.nvml_snapshot()
        ctx.cache["nvml"] = snap if snap.ok else replace(snap, gpus=())
    return ctx.cache["nvml"]


def _gpu_line(g: Gpu) -> str:
    cc = f", sm{g.cc[0]}{g.cc[1]}" if g.cc else ""
    return f"#{g.index} {g.name} ({fmt_bytes(g.total)}, {fmt_bytes(g.free)} free{cc})"


def check_accelerators(ctx: Context) -> CheckResult:
    name = "accelerators"
    snap = _nvml(ctx)
    vis, note = visible_gpus(snap.gpus, ctx.env) if snap.ok else ([], "")
    npu = ascend.npu_state(ctx)
    facts = {"nvml_ok": snap.ok, "nvml_error": snap.error, "gpus": [_gpu_line(g) for g in snap.gpus],
             "visible": [g.index for g in vis], "npus": npu.count, "npu_source": npu.source}
    found_gpu = ((f"{len(vis)} NVIDIA GPU(s) visible: " + ", ".join(_gpu_line(g) for g in vis)
                  + (f" ({note})" if note else "")) if snap.ok and snap.gpus
                 else f"no NVIDIA GPU ({snap.error or 'NVML found none'})")
    found_npu = f"{npu.count} Ascend NPU(s) ({npu.source})" if npu.count else f"no Ascend NPU ({npu.source})"
    found = f"{found_gpu}; {found_npu}"
    device = ctx.device if ctx.plan is not None else None
    want = ctx.gpus_per_node or 1
    if device == "cuda":
        if len(vis) < want:
            fix = ("nvidia-smi   # is the driver loaded? in docker: --gpus all" if not vis else
                   f"export CUDA_VISIBLE_DEVICES={','.join(str(g.index) for g in snap.gpus[:want])}")
            return CheckResult(name, "FAIL", f"the plan uses {want} CUDA GPU(s) per node; {found}", fix, facts)
        if len(vis) > want:
            return CheckResult(name, "WARN", f"{len(vis)} GPUs visible but the plan uses {want}: "
                                             f"{len(vis) - want} would sit idle; {found}",
                               f"export CUDA_VISIBLE_DEVICES={','.join(str(g.index) for g in vis[:want])}"
                               f"   # or re-plan for all: vramplan estimate --gpus {len(vis)}x...", facts)
        return CheckResult(name, "PASS", f"the plan uses {want} CUDA GPU(s); {found}", "", facts)
    if device == "npu":
        visible_npus = ascend.visible_count(npu.count, ctx.env)
        if visible_npus < want:
            return CheckResult(name, "FAIL", f"the plan uses {want} NPU(s) per node; {found}",
                               "npu-smi info   # driver loaded? in docker: --device=/dev/davinciN ...", facts)
        if visible_npus > want:
            return CheckResult(name, "WARN", f"{visible_npus} NPUs visible, the plan uses {want}; {found}",
                               f"export ASCEND_RT_VISIBLE_DEVICES={','.join(str(i) for i in range(want))}", facts)
        return CheckResult(name, "PASS", f"the plan uses {want} NPU(s); {found}", "", facts)
    if device == "cpu":
        return CheckResult(name, "PASS", f"the plan runs on the CPU (tiny models only); {found}", "", facts)
    if vis or npu.count:
        return CheckResult(name, "PASS", found, "", facts)
    return CheckResult(name, "WARN", f"no GPU or NPU found: {found}. Only CPU runs of tiny models are possible here "
                                     f"(e.g. vramplan run --demo)",
                       "nvidia-smi   # on a GPU machine: is the driver loaded? in docker: --gpus all", facts)


def _cuda_problem(driver_cuda: str | None, torch_cuda: str | None) -> tuple[str, str]:
    """(status, text) comparing the driver's CUDA with torch's CUDA build."""
    if not driver_cuda or not torch_cuda:
        return "", ""
    d = tuple(int(x) for x in driver_cuda.split(".")[:2])
    t = tuple(int(x) for x in torch_cuda.split(".")[:2])
    if d[0] < t[0]:
        return "FAIL", f"torch is built for CUDA {torch_cuda} but the driver supports only CUDA {driver_cuda}"
    if d < t:
        return "WARN", (f"torch is built for CUDA {torch_cuda}, the driver supports CUDA {driver_cuda}: runs only "
                        f"through minor-version compatibility (PTX JIT kernels may fail)")
    return "", ""


def gpu_result(snap: NvmlSnapshot, env: Mapping[str, str], plan_device: str | None, gpus_per_node: int | None,
               vram_need: int | None, compute_dtype: str | None, torch_version: str | None,
               torch_cuda: str | None, no_plan: bool) -> CheckResult:
    """Per-GPU memory vs the plan, memory held by other processes, bf16 support, driver vs torch CUDA."""
    name = "gpu"
    vis, note = visible_gpus(snap.gpus, env) if snap.ok else ([], "")
    if not vis:
        why = (snap.error or "NVML found no GPU") if not snap.ok or not snap.gpus else note
        # the plan-vs-count verdict (FAIL for a CUDA plan) is check 'accelerators'; not repeated here
        return CheckResult(name, "SKIP", f"no NVIDIA GPU to check ({why})"
                           + ("; the plan needs CUDA GPUs, see 'accelerators'" if plan_device == "cuda" else ""),
                           "", {"nvml_error": snap.error})
    used = vis[: gpus_per_node or len(vis)] if plan_device == "cuda" else vis
    fails, warns, fixes = [], [], []
    facts: dict = {"driver": snap.driver, "driver_cuda": snap.cuda_driver, "torch_cuda": torch_cuda,
                   "vram_need_bytes": vram_need, "gpus": []}
    for g in used:
        facts["gpus"].append({"index": g.index, "name": g.name, "total_bytes": g.total, "free_bytes": g.free,
                              "compute_capability": list(g.cc) if g.cc else None,
                              "processes": [{"pid": p, "used_bytes": u, "name": n} for p, u, n in g.processes]})
        others = ", ".join(f"pid {p} {n} {fmt_bytes(u) if u else '?'}" for p, u, n in g.processes)
        if vram_need is not None and plan_device == "cuda":
            if g.total < vram_need:
                fails.append(f"#{g.index} {g.name} has {fmt_bytes(g.total)}, the plan needs {fmt_bytes(vram_need)}")
            elif g.free < vram_need:
                fails.append(f"#{g.index} has {fmt_bytes(g.free)} free of {fmt_bytes(g.total)}, the plan needs "
                             f"{fmt_bytes(vram_need)}; held by {others or 'other processes'}")
                fixes.append(f"nvidia-smi --query-compute-apps=pid,used_memory --format=csv   # stop: {others}"
                             if others else "nvidia-smi   # find what holds GPU memory")
            elif g.processes:
                warns.append(f"#{g.index} is shared with {others}")
        elif g.processes:
            warns.append(f"#{g.index} has other processes: {others}")
        if compute_dtype == "bf16" and g.cc and g.cc < (8, 0):
            fails.append(f"#{g.index} {g.name} is sm{g.cc[0]}{g.cc[1]}: bf16 needs sm80+ (Ampere or newer)")
            fixes.append("vramplan estimate --gpus ... --save-plan plan.json   # re-plan: fp16 on pre-Ampere GPUs")
    if plan_device == "cuda" and not torch_cuda and torch_version:
        fails.append(f"torch {torch_version} is not a CUDA build")
        fixes.append(f"pip install --force-reinstall torch=={torch_version.split('+')[0]} --index-url "
                     f"https://download.pytorch.org/whl/cuXYZ   # XYZ <= the driver's CUDA {snap.cuda_driver}")
    status, text = _cuda_problem(snap.cuda_driver, torch_cuda)
    if text:
        (fails if status == "FAIL" else warns).append(text)
        fixes.append("install the torch build for your driver's CUDA (pytorch.org 'Get started'), or update the driver")
    summary = "; ".join(_gpu_line(g) for g in used)
    where = (f"driver {snap.driver} (CUDA {snap.cuda_driver}), torch CUDA {torch_cuda or 'n/a'}"
             + (f"; {note}" if note else ""))
    if no_plan:
        where += "; no plan, so memory is not compared with a need"
    if fails:
        return CheckResult(name, "FAIL", "; ".join(fails + warns) + f" [{where}]", "\n".join(dict.fromkeys(fixes)),
                           facts)
    if warns:
        return CheckResult(name, "WARN", "; ".join(warns) + f" [{summary}; {where}]",
                           "\n".join(dict.fromkeys(fixes)) or "nvidia-smi   # see who else uses the GPU", facts)
    need = f", plan needs {fmt_bytes(vram_need)} each" if vram_need and plan_device == "cuda" else ""
    return CheckResult(name, "PASS", f"{summary}{need}; {where}", "", facts)


def check_gpu(ctx: Context) -> CheckResult:
    snap = _nvml(ctx)
    torch_st = None
    res = ctx.probes.get("torch") if ctx.probes else None
    if res is not None:
        torch_st = res.step("torch")
    torch_st = torch_st if torch_st and torch_st.get("ok") else {}
    need = ctx.estimate.get("vram_per_gpu_bytes")
    return gpu_result(snap, ctx.env, ctx.device if ctx.plan is not None else None, ctx.gpus_per_node,
                      int(need) if isinstance(need, (int, float)) else None,
                      ctx.section("recipe").get("compute_dtype"), torch_st.get("version"), torch_st.get("cuda"),
                      ctx.plan is None)
