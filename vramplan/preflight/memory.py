"""CPU RAM (incl. a container's cgroup limit), the locked-memory limit for offload, /dev/shm size."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

from vramplan.preflight.base import CheckResult, Context, plan_hint
from vramplan.units import GiB, MiB, fmt_bytes

DOCKER_DEFAULT_SHM = 64 * MiB  # `docker run` default --shm-size
SHM_FAIL_BELOW = 256 * MiB  # DataLoader workers / NCCL SHM die with bus errors (pytorch#5040, torchtitan#853)
SHM_WARN_BELOW = 2 * GiB  # a few GB once num_workers > 0 or world_size > 1 (NVIDIA/Megatron-LM#878, idiap/ESLAM#20)


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's memory limit (cgroup v2 memory.max, v1 memory.limit_in_bytes); None if unlimited."""
    for f in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = f.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            v = int(text)
        except ValueError:
            continue
        return v if v < 2**60 else None  # v1 reports "unlimited" as a huge number
    return None


def ram_result(need: int | None, total: int, available: int, cgroup_limit: int | None,
               no_plan_reason: str = "") -> CheckResult:
    name = "cpu-ram"
    eff_total = min(total, cgroup_limit) if cgroup_limit else total
    facts = {"total_bytes": total, "available_bytes": available, "cgroup_limit_bytes": cgroup_limit,
             "need_bytes": need}
    have = (f"{fmt_bytes(available)} available of {fmt_bytes(total)}"
            + (f" (container limit {fmt_bytes(cgroup_limit)})" if cgroup_limit and cgroup_limit < total else ""))
    if need is None:
        return CheckResult(name, "SKIP", f"{have}; {no_plan_reason}", plan_hint(), facts)
    if eff_total < need:
        return CheckResult(name, "FAIL", f"the plan needs {fmt_bytes(need)} of CPU RAM per node, this machine has "
                                         f"{fmt_bytes(eff_total)} in all ({have})",
                           "vramplan estimate --offload none ...   # CPU offload is what needs the most RAM; "
                           "or a machine/container with more memory", facts)
    if available < need:
        return CheckResult(name, "WARN", f"the plan needs {fmt_bytes(need)} per node; only {have} right now "
                                         f"(other processes hold the rest)",
                           "ps aux --sort=-rss | head   # stop what holds memory", facts)
    return CheckResult(name, "PASS", f"the plan needs {fmt_bytes(need)} per node; {have}", "", facts)


def check_cpu_ram(ctx: Context) -> CheckResult:
    import psutil

    vm = psutil.virtual_memory()
    need = ctx.estimate.get("cpu_ram_bytes")
    need = int(need) if isinstance(need, (int, float)) else None
    reason = ctx.need_note() if ctx.plan is None else "the plan has no estimate.cpu_ram_bytes"
    return ram_result(need, vm.total, vm.available, cgroup_memory_limit(), reason)


def memlock_result(offload: str | None, pinned_need: int | None, soft: int, hard: int) -> CheckResult:
    """`ulimit -l` vs the page-locked (pinned) host memory that CPU offload uses.

    cudaHostAlloc pins through the driver without RLIMIT_MEMLOCK accounting, so this is a WARN, not a FAIL:
    the limit bites mlock()-based pinning and RDMA memory registration (NCCL over InfiniBand), which is why
    NVIDIA's NGC containers are started with `--ulimit memlock=-1`.
    """
    name = "memlock"
    unl = resource.RLIM_INFINITY
    shown = "unlimited" if soft == unl else fmt_bytes(soft)
    facts = {"soft_bytes": None if soft == unl else soft, "hard_bytes": None if hard == unl else hard,
             "pinned_need_bytes": pinned_need, "offload": offload}
    if offload is None:
        return CheckResult(name, "SKIP", f"ulimit -l is {shown}; no plan, so whether it offloads to CPU is unknown",
                           plan_hint(), facts)
    if offload == "none":
        return CheckResult(name, "SKIP", f"ulimit -l is {shown}; the plan does not offload to CPU, pinned memory "
                                         f"is not needed", "", facts)
    if soft == unl or (pinned_need is not None and soft >= pinned_need):
        return CheckResult(name, "PASS", f"ulimit -l is {shown}; offload pins "
                                         f"{fmt_bytes(pinned_need) if pinned_need else 'host memory'}", "", facts)
    need_txt = fmt_bytes(pinned_need) if pinned_need else "the offloaded optimizer states"
    fix = "ulimit -l unlimited   # in the launching shell; docker: --ulimit memlock=-1"
    if hard != unl:
        fix += f"\n# the hard limit is {fmt_bytes(hard)}: raise it in /etc/security/limits.conf (memlock) first"
    return CheckResult(name, "WARN", f"ulimit -l is {shown} but offload ({offload}) pins {need_txt} of host memory: "
                                     f"CUDA's own pinned buffers are not counted against the limit, but mlock-based "
                                     f"pinning and RDMA registration (NCCL over InfiniBand) are, and fail with "
                                     f"'Cannot allocate memory'; NVIDIA's containers are run with --ulimit memlock=-1",
                       fix, facts)


def check_memlock(ctx: Context) -> CheckResult:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    pinned = ctx.estimate.get("pinned_cpu_bytes")
    return memlock_result(ctx.offload if ctx.plan is not None else None,
                          int(pinned) if isinstance(pinned, (int, float)) else None, soft, hard)


def shm_result(shm_total: int | None, workers: int | None, procs_per_node: int | None) -> CheckResult:
    name = "shm"
    facts = {"shm_bytes": shm_total, "dataloader_workers": workers, "processes_per_node": procs_per_node}
    if shm_total is None:
        return CheckResult(name, "SKIP", "no /dev/shm on this system", "", facts)
    size = fmt_bytes(shm_total)
    fix = ("docker run --shm-size=32g ...   # or --ipc=host (the Ascend LLaVA guide uses 32 GB)\n"
           "mount -o remount,size=32G /dev/shm   # outside docker, as root")
    if workers is None or procs_per_node is None:
        if shm_total < SHM_FAIL_BELOW:
            return CheckResult(name, "WARN", f"/dev/shm is {size} (docker's default is 64 MiB): DataLoader workers "
                                             f"and multi-GPU NCCL will die with bus errors; fine for 0 workers on 1 "
                                             f"GPU", fix, facts)
        return CheckResult(name, "PASS", f"/dev/shm is {size}", "", facts)
    uses = workers > 0 or procs_per_node > 1
    what = f"{workers} DataLoader workers, {procs_per_node} processes per node"
    if not uses:
        return CheckResult(name, "PASS", f"/dev/shm is {size}; the plan does not use it ({what})", "", facts)
    if shm_total < SHM_FAIL_BELOW:
        return CheckResult(name, "FAIL", f"/dev/shm is {size} and the plan uses it ({what}): workers/NCCL die with "
                                         f"'Bus error ... insufficient shared memory (shm)'",
                           fix + "\nexport NCCL_SHM_DISABLE=1   # workaround for NCCL only", facts)
    if shm_total < SHM_WARN_BELOW:
        return CheckResult(name, "WARN", f"/dev/shm is {size} with {what}; a few GiB are advised", fix, facts)
    return CheckResult(name, "PASS", f"/dev/shm is {size} ({what})", "", facts)


def check_shm(ctx: Context) -> CheckResult:
    shm = Path("/dev/shm")
    total = shutil.disk_usage(shm).total if shm.is_dir() else None
    if ctx.plan is None:
        return shm_result(total, None, None)
    w = ctx.section("recipe").get("dataloader_workers")
    return shm_result(total, int(w) if isinstance(w, (int, float)) else 0, ctx.gpus_per_node or 1)
