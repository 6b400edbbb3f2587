"""Ascend NPUs: `npu-smi info` (run as a probe, parsed by vramplan/inputs/devices.py), torch_npu, the CANN
environment, ASCEND_RT_VISIBLE_DEVICES, HCCL.

CANN is sourced with `/usr/local/Ascend/ascend-toolkit/set_env.sh` (newer releases: `/usr/local/Ascend/cann-X.Y.Z/`),
which sets ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH (Huawei CANN "Software Installation" guide, environment
variables). ASCEND_RT_VISIBLE_DEVICES takes logical device ids, comma separated, in ascending order; CANN stops
parsing at the first invalid character or id (CANN "Environment Variable Reference", ASCEND_RT_VISIBLE_DEVICES).
Collectives use HCCL (torch.distributed backend "hccl", DeepSpeed accelerator/npu_accelerator.py).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from vramplan.inputs.devices import NpuChip, parse_npu_smi
from vramplan.preflight.base import CheckResult, Context

SET_ENV_CANDIDATES = ("/usr/local/Ascend/ascend-toolkit/set_env.sh", "/usr/local/Ascend/cann*/set_env.sh")


@dataclass(frozen=True)
class NpuState:
    count: int
    source: str  # how it was found, or why not
    chips: tuple[NpuChip, ...] = ()
    processes: tuple[tuple[int, int, str, int], ...] = ()  # (npu, pid, name, MB)
    error: str = ""
    facts: dict = field(default_factory=dict)


def npu_state(ctx: Context) -> NpuState:
    if "npu" in ctx.cache:
        return ctx.cache["npu"]
    res = ctx.probes.get("npu-smi") if ctx.probes else None
    davinci = sorted(glob.glob("/dev/davinci[0-9]*"))
    state: NpuState
    if res is not None and res.returncode == 0:
        chips, procs = parse_npu_smi(res.stdout)  # npu-smi was started by probes.start_npu_smi
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
