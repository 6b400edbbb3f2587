"""`vramplan preflight`: every known launch failure, checked before the job starts.

`run_checks` runs every check (or `only` those named), never stops at the first failure and never
raises: a check that crashes becomes a FAIL naming the check and the error. Heavy imports are probed
in concurrent subprocesses (vramplan/preflight/probes.py), so the whole run takes a few seconds.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vramplan.contract import ENV_DEBUG
from vramplan.preflight import accelerators, ascend, data, disk, memory, mkl, packages, torch_stack
from vramplan.preflight.base import STATUSES, CheckResult, Context
from vramplan.preflight.probes import ProbeSet, start_npu_smi, start_python_probe

__all__ = ["CHECKS", "CHECK_NAMES", "STATUSES", "CheckResult", "Context", "run_checks", "summarize"]


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[Context], CheckResult]
    probes: Callable[[Context], set]  # which subprocess probes this check reads (for this context)
    what: str  # one line for --help / docs


def _none(ctx: Context) -> set:
    return set()


def _torch(ctx: Context) -> set:
    return {"torch"}


def _gpu_probes(ctx: Context) -> set:
    return {"torch"} if accelerators._nvml(ctx).gpus else set()


def _ascend_probes(ctx: Context) -> set:
    need = {"npu-smi"}
    if importlib.util.find_spec("torch_npu") is not None:
        need.add("torch")
    return need


def _bnb_probes(ctx: Context) -> set:
    return set() if ctx.plan is not None and ctx.quant not in ("nf4", "int8") else {"accel"}


def _ds_probes(ctx: Context) -> set:
    return set() if ctx.uses_deepspeed is False else {"accel"}


CHECKS: tuple[Check, ...] = (
    Check("torchvision", torch_stack.check_torchvision, _torch,
          "torchvision imports, its compiled ops run, it is the build for the installed torch"),
    Check("transformers-import", torch_stack.check_transformers_import, _torch,
          "`from transformers import LlavaForConditionalGeneration` works"),
    Check("mkl-openmp", mkl.check_mkl, _torch, "MKL threading layer vs torch's libgomp (mkl-service abort)"),
    Check("output-dir", disk.check_output_dir, _none, "the output dir is writable (write+fsync+delete), inodes"),
    Check("disk-space", disk.check_disk_space, _none, "free disk at the output dir and the HF cache vs the plan"),
    Check("cpu-ram", memory.check_cpu_ram, _none, "available CPU RAM (and container limit) vs the plan"),
    Check("memlock", memory.check_memlock, _none, "ulimit -l vs pinned memory for CPU offload"),
    Check("shm", memory.check_shm, _none, "/dev/shm size vs DataLoader workers and processes per node"),
    Check("accelerators", accelerators.check_accelerators, _none,
          "NVIDIA GPUs (NVML) / Ascend NPUs found and visible vs the plan's count"),
    Check("gpu", accelerators.check_gpu, _gpu_probes,
          "per-GPU free memory vs the plan, other processes, bf16 (sm80+), driver CUDA vs torch"),
    Check("ascend", ascend.check_ascend, _ascend_probes,
          "npu-smi, torch_npu, CANN env, ASCEND_RT_VISIBLE_DEVICES, HCCL"),
    Check("packages", packages.check_packages, _none, "training packages present at minimum versions"),
    Check("bitsandbytes", packages.check_bitsandbytes, _bnb_probes, "an NF4 4-bit forward works on the device"),
    Check("deepspeed", packages.check_deepspeed, _ds_probes, "DeepSpeed imports; CPU Adam for offload"),
    Check("zero3-qlora", packages.check_zero3_qlora, _none, "ZeRO-3 + 4-bit version requirements"),
    Check("model", data.check_model, _none, "model dirs hold config + all weights, or are complete in the HF cache"),
    Check("dataset", data.check_dataset, _none, "LLaVA JSON valid, every image exists and opens; counts"),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)


def _probe_device(ctx: Context) -> str:
    if ctx.plan is not None and ctx.device in ("cuda", "npu", "cpu"):
        return ctx.device
    if accelerators._nvml(ctx).gpus:
        return "cuda"
    # not ascend.npu_state(): that waits for (and caches) npu-smi, which has not been started yet
    if importlib.util.find_spec("torch_npu") is not None and (
            shutil.which("npu-smi", path=ctx.env.get("PATH")) or glob.glob("/dev/davinci[0-9]*")):
        return "npu"
    return "cpu"


def _start_probes(ctx: Context, names: set) -> None:
    env = dict(ctx.env)
    device = _probe_device(ctx)
    ctx.cache["probe_device"] = device
    if "DS_ACCELERATOR" not in env and device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise guess and print a warning on stdout
    if "npu-smi" in names:
        start_npu_smi(ctx.probes, env)
    if "torch" in names:
        start_python_probe(ctx.probes, "torch", "torch", env)
    if "accel" in names:
        start_python_probe(ctx.probes, "accel", "accel", env, device)


def _crashed(name: str, e: BaseException) -> CheckResult:
    if os.environ.get(ENV_DEBUG, "") not in ("", "0"):
        traceback.print_exc(file=sys.stderr)
    return CheckResult(name, "FAIL", f"the check itself crashed: {type(e).__name__}: {e}",
                       "rerun with VRAMPLAN_DEBUG=1 for a traceback and report it")


def run_checks(plan: dict | None, output_dir: Path | str, *, dataset: Path | str | None = None,
               images: Path | str | None = None, model_paths=(), hf_cache: Path | str | None = None,
               only: list[str] | None = None, env: Mapping[str, str] | None = None,
               no_plan_reason: str = "no plan given") -> list[CheckResult]:
    """Run the checks against a plan (docs/contracts.md plan.json dict, or None) and return every result.

    `only`: run just these check names (see CHECK_NAMES); an unknown name becomes a FAIL result.
    `env`: the environment to judge (default os.environ); `no_plan_reason` explains a None plan.
    """
    ctx = Context(plan=plan if isinstance(plan, dict) else None, output_dir=Path(output_dir or os.getcwd()),
                  dataset=Path(dataset) if dataset else None, images=Path(images) if images else None,
                  model_paths=[Path(p) for p in model_paths or ()], hf_cache=Path(hf_cache) if hf_cache else None,
                  env=dict(os.environ if env is None else env), no_plan_reason=no_plan_reason,
                  probes=ProbeSet())
    wanted = list(dict.fromkeys(only)) if only else list(CHECK_NAMES)
    selected = [c for c in CHECKS if c.name in wanted]
    results: list[CheckResult] = []
    try:
        names: set = set()
        for c in selected:
            try:
                names |= c.probes(ctx)
            except Exception:  # noqa: BLE001 - the check itself will report when it runs
                pass
        try:
            _start_probes(ctx, names)
        except Exception as e:  # noqa: BLE001
            results.append(_crashed("probes", e))
        for c in selected:
            try:
                r = c.fn(ctx)
                results.append(r if isinstance(r, CheckResult) else
                               CheckResult(c.name, "FAIL", f"the check returned {type(r).__name__}, not a result"))
            except Exception as e:  # noqa: BLE001 - a crashing check is that check's FAIL
                results.append(_crashed(c.name, e))
        for name in wanted:
            if name not in CHECK_NAMES:
                results.append(CheckResult(name, "FAIL", f"no such check (checks: {', '.join(CHECK_NAMES)})"))
    finally:
        ctx.probes.close()
    return results


def summarize(results: list[CheckResult]) -> dict:
    counts = {s: 0 for s in STATUSES}
    for r in results:
        counts[r.status] += 1
    return counts
