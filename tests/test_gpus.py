"""`--gpus` grammar, representative cards for sizes, errors with suggestions, detection."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from vramplan.errors import UsageError
from vramplan.inputs import devices as D
from vramplan.inputs import gpus as G
from vramplan.inputs.profiles import all_hardware


@pytest.mark.parametrize("text,nodes,per_node,card,by_size", [
    ("1x24G", 1, 1, "a10", True),
    ("1x24GB", 1, 1, "a10", True),
    ("24g", 1, 1, "a10", True),
    ("2x80G", 1, 2, "h100-80gb", True),
    ("4x48G", 1, 4, "l40s", True),
    ("1x16GB", 1, 1, "t4-16gb", True),
    ("8x64G", 1, 8, "ascend-910b", True),  # no NVIDIA card of that size: any vendor
    ("8x910B", 1, 8, "ascend-910b", False),
    ("8xAscend910B3", 1, 8, "ascend-910b", False),
    ("4x910B4", 1, 4, "ascend-910b4", False),
    ("2xA100-80G", 1, 2, "a100-80gb", False),
    ("2xa100-40gb", 1, 2, "a100-40gb", False),
    ("4xH100", 1, 4, "h100-80gb", False),
    ("4xH100-80G", 1, 4, "h100-80gb", False),
    ("2x8xA100-80G", 2, 8, "a100-80gb", False),
    ("2\u00d78*A100-80G", 2, 8, "a100-80gb", False),  # the multiplication sign and `*` read as `x`
    ("16 x 8 x H200", 16, 8, "h200-141gb", False),
    ("A100-80G", 1, 1, "a100-80gb", False),
    ("4090", 1, 1, "rtx-4090", False),
    ("1xRTX4090", 1, 1, "rtx-4090", False),
    ("2x NVIDIA GeForce RTX 3090", 1, 2, "rtx-3090", False),
    ("1xrtx-a6000", 1, 1, "rtx-a6000", False),
    ("1xV100-32GB", 1, 1, "v100-32gb", False),
    ("2xT4", 1, 2, "t4-16gb", False),
    ("1xL4", 1, 1, "l4", False),
    ("1xL40S", 1, 1, "l40s", False),
])
def test_grammar(text, nodes, per_node, card, by_size):
    s = G.parse_gpus(text)
    assert (s.nodes, s.gpus_per_node, s.hardware.name, s.by_size_only, s.text) == (nodes, per_node, card, by_size, text)
    assert s.total_gpus == nodes * per_node
    if by_size:
        assert s.hardware.display_name in s.note and "least usable memory" in s.note
    else:
        assert s.note == ""


def test_representative_is_least_memory_card_of_that_size():
    hw = all_hardware()
    for size in {h.marketed_memory_gb for h in hw}:
        rep, cards = G.representative(size)
        pool = [h for h in cards if h.vendor == "nvidia"] or cards
        assert rep.memory_gib == min(h.memory_gib for h in pool)
        assert all(h.marketed_memory_gb == size for h in cards)
    note = G.parse_gpus("1x24G").note
    for other in ("rtx-4090", "rtx-3090", "l4"):  # the note names the cards to pick instead
        assert other in note


@pytest.mark.parametrize("text,needles", [
    ("1x23G", ["no 23 GB card", "24"]),
    ("3xB300", ["unknown GPU 'B300'"]),
    ("2xRTX4080", ["unknown GPU 'RTX4080'", "rtx-4090"]),
    ("2xA100", ["ambiguous", "a100-40gb", "a100-80gb"]),
    ("0x24G", ["must be 1"]),
    ("", ["empty"]),
    ("2x", ["unknown GPU"]),
])
def test_errors_are_one_line_with_suggestions(text, needles):
    with pytest.raises(UsageError) as e:
        G.parse_gpus(text)
    full = e.value.message + " " + e.value.hint
    assert "\n" not in e.value.message and "\n" not in e.value.hint
    for n in needles:
        assert n in full, full


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU")
def test_detection_returns_none_without_devices(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npu-smi
    # This CI host has no NVIDIA driver: NVML init fails, which must read as "nothing detected".
    snap = D.nvml_snapshot()
    assert not snap.ok and snap.error and snap.gpus == ()
    assert D.read_npu_smi() == []
    assert G.detect_local_gpus() is None


def _nvml_gives(monkeypatch, *devs, ok=True):
    gpus = tuple(D.Gpu(i, name, f"GPU-{i}", total, total, (8, 9)) for i, (name, total) in enumerate(devs))
    snap = D.NvmlSnapshot(ok, "" if ok else "NVML: NVMLError_Unknown: Unknown Error", "550.54", "12.4", gpus)
    monkeypatch.setattr(D, "nvml_snapshot", lambda: snap)


def test_detection_matches_profiles(monkeypatch):
    _nvml_gives(monkeypatch, *[("NVIDIA GeForce RTX 4090", 24564 * 2**20)] * 2)
    s = G.detect_local_gpus()
    assert (s.nodes, s.gpus_per_node, s.hardware.name) == (1, 2, "rtx-4090")
    assert s.hardware.memory_bytes == 24564 * 2**20 and "detected 2 x NVIDIA GeForce RTX 4090" in s.note
    assert s.detected == {"vendor": "nvidia", "devices": [{"name": "NVIDIA GeForce RTX 4090",
                                                           "memory_bytes": 24564 * 2**20}] * 2}
    # A100 40 vs 80 GB share the name stem: the measured memory decides
    _nvml_gives(monkeypatch, ("NVIDIA A100-SXM4-80GB", 81920 * 2**20))
    assert G.detect_local_gpus().hardware.name == "a100-80gb"
    # an unknown card: measured memory, unknown compute, said so
    _nvml_gives(monkeypatch, ("NVIDIA RTX PRO 6000", 97887 * 2**20))
    s = G.detect_local_gpus()
    assert s.hardware.name == "detected" and s.hardware.bf16_tflops == 0 and "unknown" in s.note
    assert s.hardware.memory_bytes == 97887 * 2**20
    # NVML failed after reading one GPU: detection plans with what was read
    _nvml_gives(monkeypatch, ("NVIDIA A100-SXM4-80GB", 81920 * 2**20), ok=False)
    assert G.detect_local_gpus().gpus_per_node == 1

    def boom():
        raise RuntimeError("driver exploded")
    monkeypatch.setattr(D, "nvml_snapshot", boom)
    assert G.detect_local_gpus() is None


NPU_SMI = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.rc2                 Version: 23.0.rc2                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 93.5        41                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3396 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | OK            | 90.1        40                0    / 0             |
| 0                         | 0000:01:00.0  | 0           0    / 0          3385 / 65536         |
+===========================+===============+====================================================+
"""


def _chips(text: str) -> list[tuple[str, int]]:
    return [(c.name, c.hbm_total_mb * 2**20) for c in D.parse_npu_smi(text)[0]]


def test_npu_smi_parsing(monkeypatch):
    assert _chips(NPU_SMI) == [("910B3", 65536 * 2**20)] * 2
    assert _chips(NPU_SMI.replace("910B3", "Ascend910B4").replace("65536", "32768")) == \
        [("Ascend910B4", 32768 * 2**20)] * 2
    assert _chips("garbage\n| 0 | x |") == []
    monkeypatch.setattr(D, "nvml_snapshot", lambda: D.NvmlSnapshot(False, "NVML: Driver Not Loaded"))
    monkeypatch.setattr(D, "read_npu_smi", lambda: D.parse_npu_smi(NPU_SMI)[0])
    s = G.detect_local_gpus()
    assert (s.gpus_per_node, s.hardware.name, s.hardware.vendor) == (2, "ascend-910b", "ascend")
    # only 910-family training chips are planned for; an inference card alone is "nothing detected"
    monkeypatch.setattr(D, "read_npu_smi", lambda: D.parse_npu_smi(NPU_SMI.replace("910B3", "310P3"))[0])
    assert G.detect_local_gpus() is None


def _fake_npu_smi(tmp_path, script: str) -> None:
    """An `npu-smi` executable on PATH (a stand-in: no NPU can exist here)."""
    (tmp_path / "npu-smi").write_text("#!/bin/sh\n" + script)
    (tmp_path / "npu-smi").chmod(0o755)


def test_npu_smi_subprocess(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "nvml_snapshot", lambda: D.NvmlSnapshot(False, "NVML: Driver Not Loaded"))
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    (tmp_path / "out.txt").write_text(NPU_SMI)
    _fake_npu_smi(tmp_path, f'[ "$1" = info ] && exec cat {tmp_path / "out.txt"}\nexit 3\n')
    assert D.npu_smi_argv() == [str(tmp_path / "npu-smi"), "info"]
    assert [c.name for c in D.read_npu_smi()] == ["910B3", "910B3"]
    assert G.detect_local_gpus().gpus_per_node == 2
    _fake_npu_smi(tmp_path, "echo 'dcmi module initialize failed. ret is -8005' >&2\nexit 1\n")  # no driver
    assert D.read_npu_smi() == [] and G.detect_local_gpus() is None
    _fake_npu_smi(tmp_path, "exec sleep 30\n")  # hangs: given up on at the timeout
    assert D.read_npu_smi(timeout=0.5) == []


class _FakeNvml:
    """A stand-in for pynvml (no NVIDIA driver can exist here) with the calls devices.nvml_snapshot makes."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus, fail_at=None, init_error=None):
        self.gpus, self.fail_at, self.init_error, self.shut = gpus, fail_at, init_error, False

    def _maybe_fail(self, call):
        if call == self.fail_at:
            raise self.NVMLError("Unknown Error")

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shut = True

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"  # bytes, as older pynvml returns

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return 12040

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.gpus[h]["name"]

    def nvmlDeviceGetMemoryInfo(self, h):
        self._maybe_fail(("memory", h))
        return type("Mem", (), {"total": self.gpus[h]["total"], "free": self.gpus[h]["free"]})()

    def nvmlDeviceGetUUID(self, h):
        self._maybe_fail(("uuid", h))
        return f"GPU-{h}abc"

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return (9, 0)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        if self.gpus[h].get("procs") is None:
            raise self.NVMLError("Not Supported")
        return [type("P", (), {"pid": pid, "usedGpuMemory": used})() for pid, used in self.gpus[h]["procs"]]


H200 = {"name": "NVIDIA H200", "total": 143771 * 2**20, "free": 140000 * 2**20}


def test_nvml_snapshot_reads_through_pynvml(monkeypatch):
    fake = _FakeNvml([dict(H200, procs=[(os.getpid(), 2 * 2**30), (999999999, None)]), dict(H200)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = D.nvml_snapshot()
    assert (snap.ok, snap.error, snap.driver, snap.cuda_driver) == (True, "", "550.54.15", "12.4") and fake.shut
    g0, g1 = snap.gpus
    assert (g0.index, g0.name, g0.uuid, g0.total, g0.free, g0.cc) == (0, "NVIDIA H200", "GPU-0abc", H200["total"],
                                                                        H200["free"], (9, 0))
    assert g0.processes[0][:2] == (os.getpid(), 2 * 2**30) and g0.processes[0][2] != "?"
    assert g0.processes[1] == (999999999, None, "?")  # gone, or another container's pid
    assert g1.processes == ()  # process listing not supported: still read
    assert G.detect_local_gpus().hardware.name == "h200-141gb"
    # no driver: NVML's own error text, nothing detected
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml([H200], init_error="Driver Not Loaded"))
    assert D.nvml_snapshot() == D.NvmlSnapshot(False, "NVML: Driver Not Loaded")
    # a failure after the first GPU's name and memory were read: not ok, that GPU kept for detection
    fake = _FakeNvml([dict(H200), dict(H200)], fail_at=("memory", 1))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = D.nvml_snapshot()
    assert not snap.ok and snap.error == "NVML: NVMLError: Unknown Error" and [g.index for g in snap.gpus] == [0]
    assert fake.shut and G.detect_local_gpus().gpus_per_node == 1
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml([dict(H200)], fail_at=("uuid", 0)))
    snap = D.nvml_snapshot()
    assert not snap.ok and [(g.name, g.total) for g in snap.gpus] == [("NVIDIA H200", H200["total"])]
    # pynvml (nvidia-ml-py) not installed
    monkeypatch.setitem(sys.modules, "pynvml", None)
    snap = D.nvml_snapshot()
    assert not snap.ok and "pynvml (nvidia-ml-py) is not installed" in snap.error and G.detect_local_gpus() is None
