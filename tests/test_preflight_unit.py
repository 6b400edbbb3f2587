"""Preflight checks, one family at a time. Real conditions where this machine can make them (tmpfs via
`unshare`, read-only mounts, too-small filesystems, a broken torchvision package, a real HF cache layout);
injected facts only for what cannot exist here (GPUs with other processes, NPUs, mkl-service)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vramplan import preflight
from vramplan.contract import ENV_PREFLIGHT_TIMEOUT
from vramplan.inputs import devices
from vramplan.preflight import (
    CHECK_NAMES,
    CheckResult,
    Context,
    ascend,
    disk,
    memory,
    mkl,
    packages,
    run_checks,
    torch_stack,
)
from vramplan.preflight import accelerators as acc
from vramplan.preflight.hfcache import cached_model, inspect_model_dir
from vramplan.units import GiB, MiB

PY = sys.executable


def _plan(**est) -> dict:
    base = {"schema": "vramplan-plan/1",
            "model": {"profile": "x", "path": None, "hf_ids": {"llm": "org/llm", "vision": "org/vision"}},
            "recipe": {"name": "qlora", "quant": "nf4", "compute_dtype": "bf16", "keep_checkpoints": 2,
                       "dataloader_workers": 0, "llm_lora": {"r": 8}},
            "hardware": {"device": "cuda", "total_gpus": 1, "gpus_per_node": 1, "nodes": 1},
            "strategy": {"zero_stage": 2, "offload": "none", "launcher": "python"}, "ds_config": {"x": 1},
            "data": {"dataset": None, "images": None}, "estimate": est}
    return base


# --- torch / torchvision -------------------------------------------------------------------------

@pytest.mark.parametrize("torch_v, tv", [("2.13.0+cpu", "0.28.0"), ("2.1.2", "0.16.2"), ("2.0.1", "0.15.2"),
                                         ("2.5.1+cu124", "0.20.1"), ("1.13.1", "0.14.1"), ("garbage", None)])
def test_torchvision_pairing(torch_v, tv):
    assert torch_stack.torchvision_for_torch(torch_v) == tv


def test_torchvision_fix_uses_torchs_index():
    fix = torch_stack.torchvision_fix("2.13.0+cpu")
    assert "pip uninstall -y torchvision" in fix
    assert "torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu" in fix
    assert "--index-url" not in torch_stack.torchvision_fix("2.5.1")  # PyPI torch: PyPI torchvision
    assert "whl/cu124" in torch_stack.torchvision_fix("2.5.1+cu124")


def test_pairing_problem_names_cuda_build_on_cpu_torch():
    p = torch_stack._pairing_problem("2.13.0+cpu", {"build_version": "0.28.0+cu130",
                                                    "requires_torch": ["torch (==2.13.0)"]})
    assert "CUDA build" in p and "CPU build" in p
    p = torch_stack._pairing_problem("2.13.0+cpu", {"build_version": "0.27.0", "requires_torch": ["torch (==2.12.0)"]})
    assert "not the release for torch 2.13.0+cpu (that is 0.28.0)" in p and "requires torch==2.12.0" in p
    assert torch_stack._pairing_problem("2.13.0+cpu", {"build_version": "0.28.0+cpu"}) == ""


def test_fake_broken_torchvision_fails_both_checks(tmp_path):
    """A torchvision package that raises the real error at import (fast stand-in for the real wheel)."""
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = {r.name: r for r in run_checks(None, tmp_path, only=["torchvision", "transformers-import"], env=env)}
    tv, tf = res["torchvision"], res["transformers-import"]
    assert tv.status == "FAIL" and "RuntimeError: operator torchvision::nms does not exist" in tv.detail
    assert "pip uninstall -y torchvision" in tv.fix
    assert tf.status == "FAIL" and "LlavaForConditionalGeneration" in tf.detail
    assert "torchvision::nms" in tf.detail and "torchvision" in tf.fix


# --- MKL / OpenMP --------------------------------------------------------------------------------

GOMP = {"torch_blas": "mkl", "torch_mkl": True, "numpy_blas": "mkl-rt", "mkl_service": True,
        "libs": ["libgomp.so.1", "libmkl_rt.so.2"]}


@pytest.mark.parametrize("facts, env, status, needle", [
    (GOMP, {}, "WARN", "mkl-service with libgomp"),
    (GOMP, {"MKL_SERVICE_FORCE_INTEL": "1"}, "PASS", "no MKL/OpenMP conflict"),
    (GOMP, {"MKL_THREADING_LAYER": "GNU"}, "PASS", "MKL_THREADING_LAYER=GNU"),
    (GOMP, {"MKL_THREADING_LAYER": "INTEL", "MKL_SERVICE_FORCE_INTEL": "1"}, "WARN", "two OpenMP runtimes"),
    (GOMP, {"MKL_THREADING_LAYER": "bogus"}, "WARN", "not one of"),
    (dict(GOMP, mkl_service=False, numpy_blas="scipy-openblas"), {}, "PASS", "mkl-service absent"),
    ({"torch_blas": "open", "torch_mkl": False, "numpy_blas": "openblas", "mkl_service": False,
      "libs": ["libgomp.so.1"]}, {}, "PASS", "no MKL in use"),
])
def test_mkl_env_combinations(facts, env, status, needle):
    r = mkl.assess_mkl(facts, env)
    assert r.status == status and needle in r.detail
    if status == "WARN":
        assert r.fix == "export MKL_SERVICE_FORCE_INTEL=1 MKL_THREADING_LAYER=GNU"


def test_mkl_reproduced_abort_is_fail():
    text = ("Error: mkl-service + Intel(R) MKL: MKL_THREADING_LAYER=INTEL is incompatible with libgomp.so.1 library."
            " Try to import numpy first or set the threading layer accordingly.")
    r = mkl.assess_mkl(GOMP, {}, crash_text=text)
    assert r.status == "FAIL" and "incompatible with libgomp.so.1" in r.detail and "MKL_THREADING_LAYER=GNU" in r.fix


def test_mkl_real_probe_sees_env_and_libgomp(tmp_path):
    env = dict(os.environ, MKL_THREADING_LAYER="INTEL")
    (r,) = run_checks(None, tmp_path, only=["mkl-openmp"], env=env)
    assert r.facts["MKL_THREADING_LAYER"] == "INTEL"
    assert r.facts["libs"] is not None
    if any("libgomp" in x for x in r.facts["libs"]) and r.facts["torch_mkl"]:
        assert r.status == "WARN" and "two OpenMP runtimes" in r.detail


# --- disk ----------------------------------------------------------------------------------------

def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                       capture_output=True)
    return p.returncode == 0


UNSHARE = _unshare_ok()


def _in_tmpfs(tmp_path: Path, opts: str, code: str) -> dict:
    """Mount a real tmpfs (own user+mount namespace) at tmp_path/mnt and run `code` (prints JSON) there."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(code))
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        f"mount -t tmpfs -o {opts} tmpfs {mnt} && {PY} {script} {mnt}"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not UNSHARE, reason="unshare --user --mount is not permitted here")
def test_disk_need_larger_than_real_small_tmpfs(tmp_path):
    r = _in_tmpfs(tmp_path, "size=4m", """
        import json, sys
        from vramplan.preflight.disk import space_result
        print(json.dumps(space_result(sys.argv[1] + "/run", 8 * 2**20).to_dict()))
    """)
    assert r["status"] == "FAIL"
    assert "4.00 MiB free" in r["detail"] and "need 8.00 MiB + 10% margin = 8.80 MiB" in r["detail"]
    assert r["facts"]["output_free_bytes"] == 4 * MiB


@pytest.mark.skipif(not UNSHARE, reason="unshare --user --mount is not permitted here")
def test_read_only_output_dir_fails_and_inodes(tmp_path):
    r = _in_tmpfs(tmp_path, "size=1m,ro", """
        import json, sys
        from vramplan.preflight.disk import writable_result
        print(json.dumps(writable_result(sys.argv[1] + "/run").to_dict()))
    """)
    assert r["status"] == "FAIL" and "Read-only file system" in r["detail"]
    (tmp_path / "mnt").rmdir()
    r = _in_tmpfs(tmp_path, "size=1m,nr_inodes=8", """
        import json, sys
        from vramplan.preflight.disk import writable_result
        print(json.dumps(writable_result(sys.argv[1]).to_dict()))
    """)
    assert r["status"] == "FAIL" and "free inodes" in r["detail"] and r["facts"]["inodes_free"] < 8


def test_disk_need_larger_than_this_filesystem(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    r = disk.space_result(tmp_path / "not-yet", free + 10 * GiB)
    assert r.status == "FAIL" and r.facts["measured_at"] == str(tmp_path)
    assert disk.space_result(tmp_path, 1 * MiB).status == "PASS"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_unwritable_output_dir_by_permissions(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        r = disk.writable_result(d / "run")
        assert r.status == "FAIL" and "Permission denied" in r.detail
    finally:
        d.chmod(0o755)


def test_output_path_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    r = disk.writable_result(f)
    assert r.status == "FAIL" and "not a directory" in r.detail
    ok = disk.writable_result(tmp_path / "new" / "run")
    assert ok.status == "PASS" and "does not exist yet" in ok.detail and not (tmp_path / "new").exists()


def _hf_repo(cache: Path, repo: str, files: dict[str, bytes], index: dict | None = None) -> Path:
    """A real hub-cache layout: blobs, refs/main, snapshots/<commit>/ symlinks."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = "a" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    if index is not None:
        files = dict(files, **{"model.safetensors.index.json": json.dumps(index).encode()})
    for i, (name, content) in enumerate(files.items()):
        blob = root / "blobs" / f"blob{i}"
        blob.write_bytes(content)
        (snap / name).symlink_to(blob)
    return snap


def test_cached_base_weights_are_not_counted(tmp_path):
    cache = tmp_path / "hub"
    _hf_repo(cache, "org/llm", {"config.json": b"{}", "model.safetensors": b"x" * 1000})
    _hf_repo(cache, "org/vision", {"config.json": b"{}"},
             index={"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    assert cached_model("org/llm", cache).complete and cached_model("org/llm", cache).weight_bytes == 1000
    v = cached_model("org/vision", cache)
    assert not v.complete and "2 of 2 weight shards missing" in v.problem
    plan = _plan(disk_breakdown={"base_weights": 5000, "checkpoints": 300, "final_export": 20, "logs": 10})
    ctx = Context(plan, tmp_path, env={"HF_HUB_CACHE": str(cache)})
    needs = disk.disk_needs(ctx)
    assert needs.output_bytes == 330 and needs.cache_bytes == 4000  # the vision repo is incomplete
    assert any("org/llm" in n for n in needs.notes)
    _hf_repo(cache / "x", "org/vision", {"config.json": b"{}", "model.safetensors": b"y" * 10})
    ctx = Context(plan, tmp_path, env={"HF_HUB_CACHE": str(cache / "x")})
    assert disk.disk_needs(ctx).cache_bytes == 4990  # llm missing there; the cached vision bytes subtracted


def test_base_repo_ids_prefers_the_assembled_llava_repo():
    from vramplan.preflight.hfcache import base_repo_ids

    assert base_repo_ids({"llava": "x/llava", "llm": "x/llm", "vision": "x/v"}) == ["x/llava"]
    assert base_repo_ids({"llm": "x/llm", "vision": "x/v", "bad": None}) == ["x/llm", "x/v"]
    assert base_repo_ids(None) == []


def test_hub_cache_is_the_trainers(tmp_path):
    """The cache is judged from the trainer's environment (legacy HUGGINGFACE_HUB_CACHE included), or --hf-cache."""
    from vramplan.preflight.hfcache import trainer_hub_cache

    cache = tmp_path / "legacy"
    _hf_repo(cache, "org/llm", {"config.json": b"{}", "model.safetensors": b"x" * 1000})
    (r,) = run_checks(_plan(), tmp_path, only=["model"], env={"HUGGINGFACE_HUB_CACHE": str(cache), "HF_HOME": "/nope"})
    assert "org/llm complete in the HF cache" in r.detail and "org/vision" in r.detail
    assert trainer_hub_cache(Context(None, tmp_path, env={"HF_HOME": "/h"})) == Path("/h/hub")
    assert trainer_hub_cache(Context(None, tmp_path, hf_cache=cache, env={"HF_HOME": "/h"})) == cache


def test_local_dataset_not_counted_and_shared_fs(tmp_path):
    ds = tmp_path / "d.json"
    ds.write_text("[]")
    plan = _plan(disk_breakdown={"dataset": 10**6, "checkpoints": 100})
    needs = disk.disk_needs(Context(plan, tmp_path, dataset=ds))
    assert needs.output_bytes == 100 and "not counted" in needs.notes[0]
    needs = disk.disk_needs(Context(plan, tmp_path))
    assert needs.output_bytes == 10**6 + 100
    free = shutil.disk_usage(tmp_path).free
    r = disk.space_result(tmp_path, int(free * 0.3), tmp_path / "cache", int(free * 0.3))
    assert r.status == "WARN" and "share one filesystem" in r.detail
    assert disk.disk_needs(Context(None, tmp_path)) is None


# --- memory / shm ----------------------------------------------------------------------------------

def test_ram_thresholds():
    assert memory.ram_result(None, 8 * GiB, 6 * GiB, None, "no plan").status == "SKIP"
    r = memory.ram_result(40 * GiB, 64 * GiB, 60 * GiB, 32 * GiB)
    assert r.status == "FAIL" and "32.00 GiB in all" in r.detail and "container limit" in r.detail
    assert memory.ram_result(10 * GiB, 64 * GiB, 8 * GiB, None).status == "WARN"
    assert memory.ram_result(10 * GiB, 64 * GiB, 60 * GiB, None).status == "PASS"


def test_cgroup_limit_files(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.cgroup_memory_limit(tmp_path) is None
    (tmp_path / "memory.max").write_text("2147483648\n")
    assert memory.cgroup_memory_limit(tmp_path) == 2 * GiB
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert memory.cgroup_memory_limit(tmp_path) is None


def test_memlock():
    inf = resource.RLIM_INFINITY
    assert memory.memlock_result("none", None, 8 * MiB, 8 * MiB).status == "SKIP"
    r = memory.memlock_result("optimizer", 20 * GiB, 8 * MiB, 8 * MiB)
    assert r.status == "WARN" and "ulimit -l unlimited" in r.fix and "hard limit" in r.fix
    assert memory.memlock_result("optimizer", 20 * GiB, inf, inf).status == "PASS"
    real = run_checks(_plan(pinned_cpu_bytes=2**50) | {"strategy": {"offload": "optimizer", "zero_stage": 2}},
                      ".", only=["memlock"])[0]
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert real.status == ("PASS" if soft == inf else "WARN")


def test_shm_docker_default_with_workers_fails():
    r = memory.shm_result(64 * MiB, 4, 1)
    assert r.status == "FAIL" and "--shm-size" in r.fix
    assert memory.shm_result(64 * MiB, 0, 1).status == "PASS"  # not used
    assert memory.shm_result(1 * GiB, 0, 2).status == "WARN"
    assert memory.shm_result(64 * MiB, None, None).status == "WARN"
    assert memory.shm_result(32 * GiB, 8, 8).status == "PASS"


# --- accelerators ----------------------------------------------------------------------------------

def _gpu(i, free=20 * GiB, cc=(8, 9), procs=()):
    return devices.Gpu(i, "NVIDIA GeForce RTX 4090", f"GPU-{i}abc", 24 * GiB, free, cc, tuple(procs))


def _snap(*gpus, cuda="12.4"):
    return devices.NvmlSnapshot(True, "", "550.54", cuda, tuple(gpus))


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU")
def test_no_gpu_here_is_said_plainly(tmp_path, monkeypatch):
    # an extensions dir of its own: a DeepSpeed op another test is JIT-building holds a live lock in the shared one,
    # which the deepspeed check rightly reports (WARN)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    snap = devices.nvml_snapshot()
    assert not snap.ok and snap.error
    res = {r.name: r for r in run_checks(None, tmp_path, only=["accelerators", "gpu"])}
    assert res["accelerators"].status == "WARN" and "no GPU or NPU found" in res["accelerators"].detail
    assert snap.error in res["accelerators"].detail
    assert res["gpu"].status == "SKIP"
    res = {r.name: r for r in run_checks(_plan(), tmp_path, only=["accelerators", "gpu", "bitsandbytes",
                                                                     "deepspeed"])}
    assert res["accelerators"].status == "FAIL" and "the plan uses 1 CUDA GPU" in res["accelerators"].detail
    assert res["gpu"].status == "SKIP" and "see 'accelerators'" in res["gpu"].detail  # not a second FAIL
    bnb, ds = res["bitsandbytes"], res["deepspeed"]
    assert bnb.status == "SKIP" and "torch.cuda.is_available() is False" in bnb.detail
    assert ds.status == "PASS" and "no cuda device here" in ds.detail


def test_visible_devices_parsing():
    gpus = (_gpu(0), _gpu(1), _gpu(2))
    assert [g.index for g in acc.visible_gpus(gpus, {})[0]] == [0, 1, 2]
    assert [g.index for g in acc.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "2,0"})[0]] == [2, 0]
    assert [g.index for g in acc.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "1,7,0"})[0]] == [1]
    assert acc.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": ""})[0] == []
    assert [g.index for g in acc.visible_gpus(gpus, {"CUDA_VISIBLE_DEVICES": "GPU-1a"})[0]] == [1]


def _ctx(plan, snap, env=None, npu=None):
    c = Context(plan, Path("."), env=env or {})
    c.cache["nvml"] = snap
    c.cache["npu"] = npu or ascend.NpuState(0, "npu-smi not found")
    return c


def test_a_failed_nvml_read_counts_as_no_gpu(monkeypatch, tmp_path):
    """GPUs read before an NVML error are not checked (detection for `estimate` still plans with them)."""
    partial = devices.NvmlSnapshot(False, "NVML: NVMLError_Unknown: Unknown Error", gpus=(_gpu(0),))
    monkeypatch.setattr(devices, "nvml_snapshot", lambda: partial)
    ctx = Context(_plan(), tmp_path, env={})
    snap = acc._nvml(ctx)
    assert not snap.ok and snap.gpus == () and snap.error == partial.error
    r = acc.check_accelerators(ctx)
    assert r.status == "FAIL" and "NVMLError_Unknown" in r.detail


def test_idle_visible_gpus_warn_and_too_few_fail():
    r = acc.check_accelerators(_ctx(_plan(), _snap(_gpu(0), _gpu(1))))
    assert r.status == "WARN" and "1 would sit idle" in r.detail and "CUDA_VISIBLE_DEVICES=0" in r.fix
    p2 = _plan() | {"hardware": {"device": "cuda", "total_gpus": 2, "gpus_per_node": 2}}
    r = acc.check_accelerators(_ctx(p2, _snap(_gpu(0), _gpu(1)), {"CUDA_VISIBLE_DEVICES": "1"}))
    assert r.status == "FAIL" and "shows 1 of 2" in r.detail
    assert acc.check_accelerators(_ctx(p2, _snap(_gpu(0), _gpu(1)))).status == "PASS"


def test_gpu_memory_held_by_other_processes_fails():
    busy = _gpu(0, free=3 * GiB, procs=[(4242, 20 * GiB, "python3")])
    r = acc.gpu_result(_snap(busy), {}, "cuda", 1, 10 * GiB, "bf16", "2.5.1+cu124", "12.4", False)
    assert r.status == "FAIL" and "pid 4242 python3 20.00 GiB" in r.detail and "3.00 GiB free" in r.detail
    shared = _gpu(0, free=20 * GiB, procs=[(7, 1 * GiB, "Xorg")])
    r = acc.gpu_result(_snap(shared), {}, "cuda", 1, 10 * GiB, "bf16", "2.5.1+cu124", "12.4", False)
    assert r.status == "WARN" and "shared with pid 7 Xorg" in r.detail


def test_gpu_bf16_and_cuda_versions():
    t4 = _gpu(0, cc=(7, 5))
    r = acc.gpu_result(_snap(t4), {}, "cuda", 1, 1 * GiB, "bf16", "2.5.1+cu124", "12.4", False)
    assert r.status == "FAIL" and "bf16 needs sm80+" in r.detail
    r = acc.gpu_result(_snap(_gpu(0), cuda="11.8"), {}, "cuda", 1, 1 * GiB, "bf16", "2.5.1+cu124", "12.4", False)
    assert r.status == "FAIL" and "driver supports only CUDA 11.8" in r.detail
    r = acc.gpu_result(_snap(_gpu(0), cuda="12.2"), {}, "cuda", 1, 1 * GiB, "bf16", "2.5.1+cu124", "12.4", False)
    assert r.status == "WARN" and "minor-version compatibility" in r.detail
    r = acc.gpu_result(_snap(_gpu(0)), {}, "cuda", 1, 1 * GiB, "bf16", "2.13.0+cpu", None, False)
    assert r.status == "FAIL" and "not a CUDA build" in r.detail and "download.pytorch.org/whl/cu" in r.fix
    r = acc.gpu_result(_snap(_gpu(0)), {}, None, None, None, None, "2.5.1+cu124", "12.4", True)
    assert r.status == "PASS" and "not compared" in r.detail


NPU_SMI = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.rc2                 Version: 23.0.rc2                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 93.3        36                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3162 / 65536         |
+===========================+===============+====================================================+
| 1     910B4               | OK            | 90.1        35                0    / 0             |
| 0                         | 0000:01:00.0  | 0           0    / 0          2922 / 32768         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 1       0                 | 31337         | python3                  | 2048                    |
+===========================+===============+====================================================+
"""


def test_npu_smi_parse_and_ascend_checks():
    chips, procs = devices.parse_npu_smi(NPU_SMI)
    assert [(c.npu, c.name, c.hbm_total_mb) for c in chips] == [(0, "910B3", 65536), (1, "910B4", 32768)]
    assert procs == [(1, 31337, "python3", 2048)]
    state = ascend.NpuState(2, "npu-smi info", tuple(chips), tuple(procs))
    tn = {"ok": True, "installed": True, "version": "2.1.0", "available": True, "devices": 2, "hccl": True}
    r = ascend.ascend_result(state, {}, tn, "npu", 2, ["/usr/local/Ascend/ascend-toolkit/set_env.sh"])
    assert r.status == "FAIL" and "CANN environment is not sourced" in r.detail
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in r.fix
    env = {"ASCEND_TOOLKIT_HOME": "/usr/local/Ascend/ascend-toolkit/latest", "ASCEND_RT_VISIBLE_DEVICES": "1, 2,3"}
    r = ascend.ascend_result(state, env, tn, "npu", 2, [])
    assert r.status == "WARN" and "' 2' is not a device id" in r.detail and "pid 31337" in r.detail
    r = ascend.ascend_result(ascend.NpuState(2, "npu-smi info", tuple(chips)), {"ASCEND_HOME_PATH": "/x"}, tn,
                             "npu", 2, [])
    assert r.status == "PASS" and "910B3 65536 MB" in r.detail
    r = ascend.ascend_result(ascend.NpuState(2, "npu-smi info", tuple(chips)), {"ASCEND_HOME_PATH": "/x"},
                             dict(tn, hccl=False), "npu", 2, [])
    assert r.status == "FAIL" and "HCCL" in r.detail
    assert ascend.parse_visible("0,2,1") == ([0, 2], "ids must be ascending; CANN stops at 1, so only [0, 2] are used")
    off = ascend.ascend_result(ascend.NpuState(0, "npu-smi not found"), {}, {"ok": True, "installed": False}, None, 1,
                               [])
    assert off.status == "SKIP"


def test_npu_count_vs_plan():
    chips, _ = devices.parse_npu_smi(NPU_SMI)
    state = ascend.NpuState(2, "npu-smi info", tuple(chips))
    p = _plan() | {"hardware": {"device": "npu", "total_gpus": 1, "gpus_per_node": 1}}
    r = acc.check_accelerators(_ctx(p, devices.NvmlSnapshot(False, "NVML: not found"), npu=state))
    assert r.status == "WARN" and "2 NPUs visible, the plan uses 1" in r.detail
    r = acc.check_accelerators(_ctx(p, devices.NvmlSnapshot(False, "x"), {"ASCEND_RT_VISIBLE_DEVICES": "1"}, state))
    assert r.status == "PASS"


# --- packages ----------------------------------------------------------------------------------------

def test_version_compare():
    assert packages.satisfies("2.13.0+cpu", ">=", "2.4")
    assert not packages.satisfies("0.13.0", ">", "0.13.0")
    assert packages.satisfies("0.21.2", ">", "0.13.0")


def test_packages_for_plan_and_zero3(tmp_path):
    p = _plan() | {"recipe": {"name": "lora", "quant": "none", "llm_lora": {"r": 8}},
                   "strategy": {"zero_stage": 0, "offload": "none"}, "ds_config": None}
    req, opt = packages.required_packages(Context(p, tmp_path))
    assert "peft" in req and "bitsandbytes" in opt and "deepspeed" in opt
    res = {r.name: r for r in run_checks(p, tmp_path, only=["packages", "bitsandbytes", "deepspeed", "zero3-qlora"])}
    assert res["packages"].status == "PASS"
    assert res["bitsandbytes"].status == "SKIP" and res["deepspeed"].status == "SKIP"
    assert res["zero3-qlora"].status == "SKIP"
    z3 = _plan() | {"strategy": {"zero_stage": 3, "offload": "none"}}
    (r,) = run_checks(z3, tmp_path, only=["zero3-qlora"])
    assert r.status == "PASS" and "peft" in r.detail


def test_cpu_adam_buildability():
    st = {"cpu_adam_prebuilt": False, "cpu_adam_jit_cached": [], "cpu_adam_compatible": True, "ninja": False,
          "compiler": None, "python_headers": True, "extensions_dir": "/x"}
    _, missing = packages._cpu_adam(st)
    assert missing == ["ninja is missing", "no C++ compiler (c++/g++/clang++)"]
    assert "pip install ninja" in packages._cpu_adam_fix(st) and "build-essential" in packages._cpu_adam_fix(st)
    ok = dict(st, ninja=True, compiler="/usr/bin/c++")
    assert packages._cpu_adam(ok)[1] == [] and "JIT-compiled" in packages._cpu_adam(ok)[0]
    assert packages._cpu_adam(dict(st, cpu_adam_prebuilt=True)) == ("prebuilt in the installed wheel", [])


# --- model / dataset -----------------------------------------------------------------------------------

def test_model_dirs_and_hf_ids(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text("{}")
    (good / "model.safetensors").write_bytes(b"x" * 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors"}}))
    assert inspect_model_dir(good).complete
    (r,) = run_checks(None, tmp_path, model_paths=[good], only=["model"])
    assert r.status == "PASS" and "64 B" in r.detail
    (r,) = run_checks(None, tmp_path, model_paths=[bad, tmp_path / "nope"], only=["model"])
    assert r.status == "FAIL" and "1 of 1 weight shards missing" in r.detail and "does not exist" in r.detail
    cache = tmp_path / "hub"
    _hf_repo(cache, "org/llm", {"config.json": b"{}", "model.safetensors": b"w"})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    (r,) = run_checks(_plan(), tmp_path, only=["model"], env=env)
    assert r.status == "FAIL" and "org/vision" in r.detail and "HF_HUB_OFFLINE" in r.detail
    assert "huggingface-cli download org/llm org/vision" in r.fix
    (r,) = run_checks(_plan(), tmp_path, only=["model"], env={"HF_HUB_CACHE": str(cache)})
    assert r.status == "WARN" and "will be downloaded" in r.detail


def test_dataset_check_names_records(tmp_path):
    from PIL import Image

    imgs = tmp_path / "images"
    imgs.mkdir()
    Image.new("RGB", (8, 8)).save(imgs / "a.png")
    recs = [{"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                            {"from": "gpt", "value": "a"}]},
            {"id": "gone", "image": "b.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                              {"from": "gpt", "value": "a"}]}]
    ds = tmp_path / "d.json"
    ds.write_text(json.dumps(recs))
    (r,) = run_checks(None, tmp_path, dataset=ds, images=imgs, only=["dataset"])
    assert r.status == "FAIL" and "record #1 (id='gone')" in r.detail and "1 of 2 records" in r.detail
    (r,) = run_checks(None, tmp_path, dataset=ds, images=tmp_path / "nope", only=["dataset"])
    assert r.status == "FAIL" and "does not exist" in r.detail
    ds.write_text("{]")
    (r,) = run_checks(None, tmp_path, dataset=ds, only=["dataset"])
    assert r.status == "FAIL" and "not valid JSON" in r.detail
    ds.write_text(json.dumps(recs[:1]))
    (r,) = run_checks(None, tmp_path, dataset=ds, images=imgs, only=["dataset"])
    assert r.status == "PASS" and "1 samples, 1 with an image" in r.detail


# --- the runner ---------------------------------------------------------------------------------------

def test_crashing_check_becomes_fail_and_others_run(tmp_path, monkeypatch):
    def boom(ctx):
        raise ZeroDivisionError("division by zero")

    checks = tuple(c if c.name != "shm" else preflight.Check("shm", boom, c.probes, c.what) for c in preflight.CHECKS)
    monkeypatch.setattr(preflight, "CHECKS", checks)
    res = run_checks(None, tmp_path, only=["shm", "output-dir", "nonsense"])
    assert [r.name for r in res] == ["output-dir", "shm", "nonsense"]
    assert res[1].status == "FAIL" and "the check itself crashed: ZeroDivisionError" in res[1].detail
    assert res[0].status == "PASS"
    assert res[2].status == "FAIL" and "no such check" in res[2].detail


def test_result_shape():
    r = CheckResult("x", "PASS", "d", "f", {"a": 1})
    assert list(r.to_dict()) == ["name", "status", "detail", "fix", "facts"]
    with pytest.raises(ValueError):
        CheckResult("x", "OK", "d")
    assert len(CHECK_NAMES) == len(set(CHECK_NAMES)) >= 17


# --- probes that crash or hang ------------------------------------------------------------------------

def _fake_torchvision(tmp_path: Path, body: str) -> dict:
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body)
    return dict(os.environ, PYTHONPATH=str(tmp_path))


def test_probe_process_that_aborts_does_not_take_preflight_down(tmp_path):
    """A torchvision whose import kills the interpreter (SIGABRT): the steps before it still count."""
    env = _fake_torchvision(tmp_path, "import os\nos.abort()\n")
    res = {r.name: r for r in run_checks(None, tmp_path, only=["torchvision", "transformers-import", "mkl-openmp"],
                                         env=env)}
    tv = res["torchvision"]
    assert tv.status == "FAIL" and "crashed the process" in tv.detail and "exit -6" in tv.detail
    assert tv.facts["torch"].startswith("2.")  # the torch step reported before the crash
    assert res["transformers-import"].status == "FAIL" and "crashed" in res["transformers-import"].detail


def test_probe_that_hangs_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_PREFLIGHT_TIMEOUT, "4")
    env = _fake_torchvision(tmp_path, "import time\ntime.sleep(120)\n")
    (tv,) = run_checks(None, tmp_path, only=["torchvision"], env=env)
    assert tv.status == "FAIL" and "hung and was stopped" in tv.detail


def test_parse_steps_ignores_noise():
    from vramplan.preflight.probes import MARK, parse_steps

    out = f"[WARNING] deepspeed noise\n{MARK} {{\"key\": \"a\", \"value\": {{\"ok\": true}}}}\n{MARK} not json\n"
    assert parse_steps(out) == {"a": {"ok": True}}


def test_npu_smi_on_path_is_run_and_parsed(tmp_path):
    """An `npu-smi` executable (stand-in: no NPU can exist here) goes through the real subprocess path."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "out.txt").write_text(NPU_SMI)
    exe = bin_dir / "npu-smi"
    exe.write_text(f"#!/bin/sh\n[ \"$1\" = info ] && exec cat {tmp_path / 'out.txt'}\nexit 3\n")
    exe.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("ASCEND_TOOLKIT_HOME", None)
    env.pop("ASCEND_HOME_PATH", None)
    res = {r.name: r for r in run_checks(None, tmp_path, only=["accelerators", "ascend"], env=env)}
    assert res["accelerators"].status == "PASS" and "2 Ascend NPU(s) (npu-smi info)" in res["accelerators"].detail
    a = res["ascend"]
    assert a.status == "WARN" and "CANN environment is not sourced" in a.detail and "910B4 32768 MB" in a.detail
    p = _plan() | {"hardware": {"device": "npu", "total_gpus": 2, "gpus_per_node": 2}}
    (a,) = run_checks(p, tmp_path, only=["ascend"], env=env)
    assert a.status == "FAIL" and "torch_npu is not installed" in a.detail


def test_in_process_checks_import_no_heavy_module(tmp_path):
    code = ("import sys\nfrom vramplan.preflight import run_checks\n"
            "run_checks(None, '.', only=['accelerators', 'packages', 'output-dir', 'cpu-ram', 'shm', 'memlock',"
            " 'disk-space', 'model', 'zero3-qlora'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([PY, "-c", code], check=True, cwd=tmp_path)


def test_a_killed_op_builds_lock_fails_a_deepspeed_plan():
    """torch's FileBaton lock left by a killed JIT build makes every later build wait forever (pytorch#189245)."""
    st = {"baton_locks": True, "build_locks": [["/x/cpu_adam/lock", 3600], ["/x/fused_adam/lock", 700]]}
    r = packages.build_lock_result("deepspeed", "deepspeed 0.19", st, uses=True)
    assert r.status == "FAIL" and "/x/cpu_adam/lock (+1 more)" in r.detail and "60 min ago" in r.detail
    assert r.fix.startswith("rm -f /x/cpu_adam/lock /x/fused_adam/lock")
    assert packages.build_lock_result("deepspeed", "d", st, uses=False).status == "WARN"  # no plan: a warning
    young = packages.build_lock_result("deepspeed", "d", {"build_locks": [["/x/a/lock", 20]]}, uses=True)
    assert young.status == "WARN" and "20 s ago" in young.detail and "if no build is running" in young.fix
    assert packages.build_lock_result("deepspeed", "d", {"build_locks": []}, uses=True) is None
    # a torch whose build lock is an OS-level flock (released when its holder dies) keeps the file: not a hang
    assert packages.build_lock_result("deepspeed", "d", dict(st, baton_locks=False), uses=True) is None
