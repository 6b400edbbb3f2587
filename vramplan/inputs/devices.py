"""The accelerators on this host, read once for every caller: NVIDIA GPUs through NVML, Ascend NPUs through `npu-smi`.

Two callers: `vramplan estimate` without --gpus plans for what is found here (vramplan/inputs/gpus.py), and
preflight checks it against a plan (vramplan/preflight/accelerators.py and ascend.py). Nothing here is heavy:
pynvml (package nvidia-ml-py) is a ctypes binding and npu-smi a subprocess. Nothing here raises for a missing
library, driver or tool: the failure is reported in the result.

NVML (NVIDIA "NVML API Reference Guide", Device and System Queries): nvmlSystemGetCudaDriverVersion_v2 gives the
newest CUDA the driver supports as 1000 * major + 10 * minor; nvmlDeviceGetComputeRunningProcesses lists the
processes that hold memory on a device (usedGpuMemory may be unavailable in a container).

`npu-smi info` (Huawei Ascend "npu-smi Command Reference", info): per NPU a `| <npu> <name> | <health> | power
temp hugepages |` row, then a `| <chip> | <bus-id> | aicore memory-usage(MB) HBM-usage(MB) used / total |` row;
a process table (`| <npu> <chip> | <pid> | <name> | <MB> |`) follows its `Process id` header. Its MB are MiB
(a 910B3 reports 65536 MB, 64 GiB of HBM). Newer CANN names the chips `Ascend910B4`, older `910B4`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace

# --- NVIDIA: NVML ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str
    total: int
    free: int
    cc: tuple[int, int] | None
    processes: tuple[tuple[int, int | None, str], ...] = ()  # (pid, used bytes or None, name)


@dataclass(frozen=True)
class NvmlSnapshot:
    """Every NVIDIA GPU NVML reports. `ok` False with `error` when NVML could not be read completely; `gpus` then
    holds the devices whose name and memory were read before the failure (detection plans with those; preflight
    checks only a complete read)."""

    ok: bool
    error: str = ""
    driver: str | None = None
    cuda_driver: str | None = None  # e.g. "12.4": the newest CUDA the driver supports
    gpus: tuple[Gpu, ...] = field(default_factory=tuple)


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _proc_name(pid: int) -> str:
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:  # noqa: BLE001 - another container's pid, or gone
        return "?"


def _details(pynvml, h, gpu: Gpu) -> Gpu:
    """UUID, compute capability and the processes holding memory (the last two are optional on some boards)."""
    try:
        cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
    except Exception:  # noqa: BLE001
        cc = None
    procs = []
    try:
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            used = getattr(p, "usedGpuMemory", None)
            procs.append((int(p.pid), int(used) if used is not None else None, _proc_name(int(p.pid))))
    except Exception:  # noqa: BLE001 - not supported on some boards/containers
        pass
    return replace(gpu, uuid=_text(pynvml.nvmlDeviceGetUUID(h)), cc=cc, processes=tuple(procs))


def nvml_snapshot() -> NvmlSnapshot:
    """Read every NVIDIA GPU through NVML; on a machine without the library or the driver, the NVML error text."""
    try:
        import pynvml
    except ImportError as e:
        return NvmlSnapshot(False, f"pynvml (nvidia-ml-py) is not installed: {e}")
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return NvmlSnapshot(False, f"NVML: {e}")
    gpus: list[Gpu] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(pynvml.nvmlDeviceGetName(h))
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(Gpu(i, name, "", int(mem.total), int(mem.free), None))
            gpus[-1] = _details(pynvml, h, gpus[-1])
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            v = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda = f"{v // 1000}.{(v % 1000) // 10}"
        except Exception:  # noqa: BLE001
            cuda = None
        return NvmlSnapshot(True, "", driver, cuda, tuple(gpus))
    except Exception as e:  # noqa: BLE001
        return NvmlSnapshot(False, f"NVML: {type(e).__name__}: {e}", gpus=tuple(gpus))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


# --- Ascend: npu-smi ------------------------------------------------------------------------------

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


def parse_npu_smi(text: str) -> tuple[list[NpuChip], list[tuple[int, int, str, int]]]:
    """Chips (name, health, HBM used/total MB) and processes (npu, pid, name, MB) from `npu-smi info` output."""
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


def npu_smi_argv(path: str | None = None) -> list[str] | None:
    """The `npu-smi info` command line, found on `path` (default: this process's PATH); None when not installed."""
    exe = shutil.which("npu-smi", path=path)
    return [exe, "info"] if exe else None


def read_npu_smi(timeout: float = 10.0) -> list[NpuChip]:
    """The NPUs `npu-smi info` reports here; [] when npu-smi is missing, fails, hangs or prints no chip."""
    argv = npu_smi_argv()
    if argv is None:
        return []
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_npu_smi(p.stdout)[0] if p.returncode == 0 else []
