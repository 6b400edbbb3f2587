"""Ascend NPUs: `npu-smi info`, torch_npu, the CANN environment, ASCEND_RT_VISIBLE_DEVICES, HCCL.

Ascend docs (the npu-smi reference; CANN's environment-variable reference for ASCEND_RT_VISIBLE_DEVICES):
`npu-smi info` prints per NPU a `| id name | health | ...` row and a
`| chip | bus-id | aicore mem used/total hbm used/total |` row (910B1-B3 and B4-1: 65536 MB HBM, B4: 32768);
CANN is sourced with `/usr/local/Ascend/ascend-toolkit/set_env.sh`, which sets ASCEND_TOOLKIT_HOME /
ASCEND_HOME_PATH; ASCEND_RT_VISIBLE_DEVICES takes ascending comma-separated ids and CANN stops parsing at
the first invalid one; collectives use HCCL.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from typing import Mapping

from vramplan.preflight.base import CheckResult, Context

SET_ENV_CANDIDATES = ("/usr/local/Ascend/ascend-toolkit/set_env.sh", "/usr/local/Ascend/cann*/set_env.sh")

_NPU_ROW = re.compile(r"^\|\s*(\d+)\s+(\S+)\s*\|\s*(\w+)\s*\|")
_CHIP_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*[0-9A-Fa-f]{4}:[0-9A-Fa-f:.]+\s*\|.*?(\d+)\s*/\s*(\d+)\s*\|\s*$")
_PROC_ROW = re.compile(r"^\|\s*(\d+)\s+(\d+)\s*\|\s*(\d+)\s*\|\s*(\S+)\s*\|\s*(\d+)\s*\|")


@dataclass(frozen=True)
class NpuChip:
    npu: int
    name: str
    health: str
    hbm_used_mb: int | None = None
    hbm_total_mb: int | None = None


@dataclass(frozen=True)
class NpuState:
    count: int
    source: str  # how it was found, or why not
    chips: tuple[NpuChip, ...] = ()
    processes: tuple[tuple[int, int, str, int], ...] = ()  # (npu, pid, name, MB)
    error: str = ""
    facts: dict = field(default_factory=dict)


def parse_npu_smi(text: str) -> tuple[list[NpuChip], list[tuple[int, int, str, int]]]:
    """Chips (name, health, HBM used/total MB) and processes from `npu-smi info` output."""
    chips: list[NpuChip] = []
    procs: list[tuple[int, int, str, int]] = []
    pending: tuple[int, str, str] | None = None
    in_procs = False
    for line in text.splitlines():
        if "Process id" in line or "Process name" in line:
            in_procs = True
            continue
        if in_procs:
            m = _PROC_ROW.match(line)
            if m:
                procs.append((int(m.group(1)), int(m.group(3)), m.group(4), int(m.group(5))))
            continue
        m = _NPU_ROW.match(line)
        if m and not _CHIP_ROW.match(line) and m.group(2) not in ("Name",):
            pending = (int(m.group(1)), m.group(2), m.group(3))
            continue
        m = _CHIP_ROW.match(line)
        if m and pending is not None:
            chips.append(NpuChip(pending[0], pending[1], pending[2], int(m.group(2)), int(m.group(3))))
            pending = None
    return chips, procs


def npu_state(ctx: Context) -> NpuState:
    if "npu" in ctx.cache:
        return ctx.cache["npu"]
    res = ctx.probes.get("npu-smi") if ctx.probes else None
    davinci = sorted(glob.glob("/dev/davinci[0-9]*"))
    state: NpuState
    if res is not None and res.returncode == 0:
        chips, procs = parse_npu_smi(res.stdout)
        state = NpuState(len(chips), "npu-smi info", tuple(chips), tuple(procs))
    elif res is not None:
        err = (res.stderr or res.stdout).strip().splitlines()[-1:] or [res.died() or f"exit {res.returncode}"]
        state = NpuState(len(davinci), f"npu-smi info failed: {err[0]}", error=err[0])
    elif davinci:
        state = NpuState(len(davinci), f"{len(davinci)} /dev/davinci* device nodes; npu-smi not found")
    else:
        state = NpuState(0, "npu-smi not found, no /dev/davinci* devices")
    ctx.cache["npu"] = state
    return state


def parse_visible(raw: str) -> tuple[list[int], str]:
    """ASCEND_RT_VISIBLE_DEVICES -> ids CANN uses, and a problem text ('' if well-formed)."""
    ids: list[int] = []
    for tok in raw.split(","):
        if not re.fullmatch(r"\d+", tok):
            return ids, f"{tok!r} is not a device id: CANN stops parsing there, so only {ids or 'none'} are used"
        if ids and int(tok) <= ids[-1]:
            return ids, f"ids must be ascending; CANN stops at {tok}, so only {ids} are used"
        ids.append(int(tok))
    return ids, ""


def visible_count(count: int, env: Mapping[str, str]) -> int:
    raw = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if raw is None:
        return count
    ids, _ = parse_visible(raw)
    return len([i for i in ids if i < count]) if count else len(ids)


def ascend_result(state: NpuState, env: Mapping[str, str], torch_npu: dict | None, plan_device: str | None,
                  gpus_per_node: int | None, set_env_files: list[str]) -> CheckResult:
    name = "ascend"
    facts = {"npus": state.count, "source": state.source, "torch_npu": torch_npu,
             "chips": [c.__dict__ for c in state.chips], "processes": [list(p) for p in state.processes]}
    torch_npu = torch_npu or {}
    # a step that failed (ok False) means torch_npu is there but its import broke
    tn_installed = bool(torch_npu.get("installed") or torch_npu.get("ok") is False)
    if plan_device != "npu" and not state.count and not tn_installed:
        return CheckResult(name, "SKIP", f"no Ascend NPU ({state.source}); torch_npu not installed", "", facts)
    fails, warns, fixes = [], [], []
    home = env.get("ASCEND_TOOLKIT_HOME") or env.get("ASCEND_HOME_PATH")
    if not home:
        src = set_env_files[0] if set_env_files else "/usr/local/Ascend/ascend-toolkit/set_env.sh"
        (fails if plan_device == "npu" else warns).append(
            "the CANN environment is not sourced (ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH unset)"
            + ("" if set_env_files else "; no set_env.sh found under /usr/local/Ascend"))
        fixes.append(f"source {src}")
    raw = env.get("ASCEND_RT_VISIBLE_DEVICES")
    if raw is not None:
        _, problem = parse_visible(raw)
        if problem:
            warns.append(f"ASCEND_RT_VISIBLE_DEVICES={raw!r}: {problem}")
            fixes.append("export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3   # ascending ids, commas only")
    if not tn_installed:
        (fails if plan_device == "npu" else warns).append("torch_npu is not installed (torch cannot use the NPUs)")
        fixes.append("pip install torch_npu==<the release for your torch and CANN>   # see Ascend/pytorch README")
    elif torch_npu.get("ok") is False:
        fails.append(f"import torch_npu fails: {torch_npu.get('error')}")
        fixes.append("source the CANN set_env.sh, then reinstall the torch_npu matching torch and CANN")
    elif not torch_npu.get("available"):
        fails.append("torch_npu imports but torch.npu.is_available() is False")
        fixes.append("npu-smi info   # driver/devices; in docker pass --device=/dev/davinciN /dev/davinci_manager ...")
    elif (gpus_per_node or 1) > 1 and not torch_npu.get("hccl"):
        fails.append("HCCL is not available to torch.distributed (multi-NPU runs need backend 'hccl')")
        fixes.append("source the CANN set_env.sh (HCCL ships with CANN)")
    if state.error:
        warns.append(f"npu-smi: {state.error}")
    if plan_device == "npu" and state.count == 0 and not torch_npu.get("devices"):
        fails.append(f"the plan is for NPUs but none was found ({state.source})")
    busy = [f"NPU {n} pid {pid} {pname} {mb} MB" for n, pid, pname, mb in state.processes]
    if busy:
        warns.append("NPUs in use by other processes: " + ", ".join(busy))
    chips = ", ".join(f"{c.npu}:{c.name} {c.hbm_total_mb} MB HBM ({c.health})" for c in state.chips)
    found = f"{state.count} NPU(s) ({state.source}{': ' + chips if chips else ''})"
    if tn_installed and torch_npu.get("ok") is not False:
        found += f"; torch_npu {torch_npu.get('version')}, {torch_npu.get('devices', 0)} device(s), " \
                 f"HCCL {'yes' if torch_npu.get('hccl') else 'no'}"
    if fails:
        return CheckResult(name, "FAIL", "; ".join(fails + warns) + f" [{found}]", "\n".join(dict.fromkeys(fixes)),
                           facts)
    if warns:
        return CheckResult(name, "WARN", "; ".join(warns) + f" [{found}]", "\n".join(dict.fromkeys(fixes)), facts)
    return CheckResult(name, "PASS", f"{found}; CANN at {home}", "", facts)


def check_ascend(ctx: Context) -> CheckResult:
    state = npu_state(ctx)
    res = ctx.probes.get("torch") if ctx.probes else None
    tn = res.step("torch_npu") if res is not None else None
    files = sorted(f for pat in SET_ENV_CANDIDATES for f in glob.glob(pat))
    return ascend_result(state, ctx.env, tn, ctx.device if ctx.plan is not None else None, ctx.gpus_per_node, files)
