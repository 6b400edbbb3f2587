"""`vramplan preflight` as a user runs it: JSON envelope contract, exit codes 0 / 4 / 2, the table,
and (slow) a genuinely broken torchvision installed from the real wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vramplan.commands.output import ENVELOPE_KEYS
from vramplan.preflight import CHECK_NAMES

REPO = Path(__file__).resolve().parent.parent
VRAMPLAN = [sys.executable, "-m", "vramplan"]
CHECK_KEYS = {"name", "status", "detail", "fix", "facts"}


def _run(args, env=None, cwd=None, timeout=120):
    e = dict(os.environ, NO_COLOR="1", COLUMNS="200")
    e.update(env or {})
    return subprocess.run(VRAMPLAN + args, capture_output=True, text=True, env=e, cwd=cwd, timeout=timeout)


def _envelope(p) -> dict:
    env = json.loads(p.stdout)
    assert tuple(sorted(env)) == tuple(sorted(ENVELOPE_KEYS))
    assert env["schema"] == "vramplan/1" and env["command"] == "preflight" and env["exit_code"] == p.returncode
    return env


def _plan_file(tmp_path: Path, **over) -> Path:
    plan = {"schema": "vramplan-plan/1", "model": {"profile": None, "path": None, "hf_ids": {}},
            "recipe": {"name": "lora", "quant": "none", "keep_checkpoints": 1, "dataloader_workers": 0},
            "hardware": {"device": "cpu", "total_gpus": 1, "gpus_per_node": 1},
            "strategy": {"zero_stage": 0, "offload": "none", "launcher": "python"}, "ds_config": None,
            "data": {"dataset": None, "images": None}, "output_dir": str(tmp_path / "run"),
            "estimate": {"disk_bytes": 10**6, "disk_breakdown": {"checkpoints": 10**6}, "cpu_ram_bytes": 2**20}}
    for k, v in over.items():
        plan[k] = v
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    return p


def test_full_run_on_this_machine(tmp_path):
    """Every check, real probes: the envelope is pinned, nothing crashes, no GPU is said plainly."""
    t0 = time.monotonic()
    p = _run(["preflight", "--json", "--output", str(tmp_path)], cwd=tmp_path)
    wall = time.monotonic() - t0
    env = _envelope(p)
    checks = env["data"]["checks"]
    assert [c["name"] for c in checks] == list(CHECK_NAMES)
    for c in checks:
        assert set(c) == CHECK_KEYS and c["status"] in ("PASS", "WARN", "FAIL", "SKIP") and c["detail"]
        assert "the check itself crashed" not in c["detail"], c
    s = env["data"]["summary"]
    assert s["total"] == len(checks) == sum(s[k] for k in ("PASS", "WARN", "FAIL", "SKIP"))
    assert p.returncode == (4 if s["FAIL"] else 0)
    assert p.returncode != 0 or env["status"] == "ok"
    by = {c["name"]: c for c in checks}
    assert by["torchvision"]["status"] in ("PASS", "SKIP")  # clean venv: absent or working
    assert by["transformers-import"]["status"] == "PASS"
    if shutil.which("nvidia-smi") is None:
        assert "no GPU or NPU found" in by["accelerators"]["detail"]
        assert env["data"]["plan"]["source"].startswith("no plan")  # no hardware: needs unknown, said
        assert by["disk-space"]["status"] == "SKIP" and "needs are unknown" in by["disk-space"]["detail"]
    assert wall < 60, f"preflight took {wall:.1f} s"  # ~4 s on an idle 2-core machine; loose: cores are shared


def test_plan_disk_need_too_large_exits_4(tmp_path):
    plan = _plan_file(tmp_path, estimate={"disk_breakdown": {"checkpoints": 10**18}, "cpu_ram_bytes": 1})
    p = _run(["preflight", "--plan", str(plan), "--check", "disk-space", "--check", "cpu-ram", "--json"])
    env = _envelope(p)
    assert p.returncode == 4 and env["status"] == "fail"
    disk, ram = env["data"]["checks"]
    assert disk["status"] == "FAIL" and "not enough free disk" in disk["detail"] and "909494.70 TiB" in disk["detail"]
    assert disk["facts"]["output_need_bytes"] == 10**18 and disk["facts"]["measured_at"] == str(tmp_path)
    assert ram["status"] == "PASS"
    assert env["errors"][0]["code"] == "preflight_failed" and "disk-space" in env["errors"][0]["message"]
    assert env["data"]["plan"]["source"].startswith("plan file")


def test_plan_that_fits_exits_0_and_table(tmp_path):
    plan = _plan_file(tmp_path)
    p = _run(["preflight", "--plan", str(plan), "--check", "disk-space", "--check", "output-dir"])
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for word in ("check", "status", "what was found", "fix", "disk-space", "output-dir", "PASS"):
        assert word in out
    assert "\x1b[" not in out  # NO_COLOR
    assert "2 checks: 2 PASS, 0 WARN, 0 FAIL, 0 SKIP" in out


def test_strict_turns_warn_into_exit_4(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    ds = tmp_path / "d.json"
    ds.write_text(json.dumps([{"id": 1, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    args = ["preflight", "--check", "dataset", "--dataset", str(ds), "--json"]
    p = _run(args)
    assert p.returncode == 0 and _envelope(p)["data"]["checks"][0]["status"] == "WARN"  # no --images given
    p = _run([*args, "--strict"])
    assert p.returncode == 4 and _envelope(p)["status"] == "fail"
    p = _run([*args, "--images", str(tmp_path)])
    assert p.returncode == 0 and _envelope(p)["data"]["checks"][0]["status"] == "PASS"


@pytest.mark.parametrize("args, needle", [
    (["--check", "bogus"], "Invalid value for '--check'"),
    (["--plan", "/nonexistent/plan.json"], "--plan /nonexistent/plan.json: No such file"),
    (["--dataset", "/nonexistent/d.json"], "--dataset"),
])
def test_usage_errors_exit_2(args, needle):
    p = _run(["preflight", *args])
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr
    pj = _run(["preflight", *args, "--json"])
    assert pj.returncode == 2 and _envelope(pj)["status"] == "error"


def test_plan_and_estimate_flags_conflict(tmp_path):
    p = _run(["preflight", "--plan", str(_plan_file(tmp_path)), "--gpus", "1x24G"])
    assert p.returncode == 2 and "--plan and --gpus" in p.stderr


def test_estimate_flags_give_the_needs(tmp_path):
    p = _run(["preflight", "--gpus", "1x24G", "--check", "disk-space", "--check", "cpu-ram", "--json",
              "--output", str(tmp_path)])
    env = _envelope(p)
    assert env["data"]["plan"]["source"] == "the estimate for the given flags (the pick)"
    assert "1 x" in env["data"]["plan"]["describe"]
    disk, ram = env["data"]["checks"]
    assert disk["status"] != "SKIP" and disk["facts"]["output_need_bytes"] > 0
    assert ram["status"] != "SKIP" and ram["facts"]["need_bytes"] > 0
    assert p.returncode == (4 if "FAIL" in (disk["status"], ram["status"]) else 0)


def test_malformed_dataset_is_a_check_fail_not_a_usage_error(tmp_path):
    ds = tmp_path / "d.json"
    ds.write_text('{"not": "a list"}')
    p = _run(["preflight", "--gpus", "1x24G", "--dataset", str(ds), "--check", "dataset", "--json"])
    env = _envelope(p)
    assert p.returncode == 4
    c = env["data"]["checks"][0]
    assert c["status"] == "FAIL" and "top level is a JSON dict, not a list" in c["detail"]


def test_flags_that_fit_nowhere_exit_3():
    p = _run(["preflight", "--gpus", "1x16G", "--recipe", "full", "--offload", "none", "--zero", "0",
              "--check", "shm"])
    assert p.returncode == 3 and "fits no candidate" in p.stderr


def test_bad_plan_schema(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"schema": "other"}')
    p = _run(["preflight", "--plan", str(f)])
    assert p.returncode == 2 and "not a vramplan plan" in p.stderr


# --- a genuinely broken torchvision ------------------------------------------------------------------

WHEELS = REPO / ".cache" / "wheels"


def _torchvision_wheel() -> Path:
    found = sorted(WHEELS.glob("torchvision-0.28.0-*.whl"))
    if found:
        return found[0]
    WHEELS.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "torchvision==0.28.0", "-d", str(WHEELS)], capture_output=True, text=True, timeout=300)
    found = sorted(WHEELS.glob("torchvision-0.28.0-*.whl"))
    if p.returncode != 0 or not found:
        pytest.skip(f"cannot download torchvision==0.28.0 from PyPI: {(p.stderr or p.stdout).strip()[-300:]}")
    return found[0]


@pytest.mark.slow
def test_real_broken_torchvision(tmp_path):
    import torch

    if not torch.__version__.startswith("2.13.0"):
        pytest.skip(f"torchvision 0.28.0 is the release for torch 2.13.0, not {torch.__version__}")
    target = tmp_path / "tvbroken"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(_torchvision_wheel())], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    pp = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    p = _run(["preflight", "--json", "--output", str(tmp_path)], env={"PYTHONPATH": pp}, cwd=tmp_path)
    env = _envelope(p)
    assert p.returncode == 4
    by = {c["name"]: c for c in env["data"]["checks"]}
    tv, tf = by["torchvision"], by["transformers-import"]
    assert tv["status"] == "FAIL" and "operator torchvision::nms does not exist" in tv["detail"]
    if "+cpu" in torch.__version__:
        assert "CUDA build" in tv["detail"]
        assert "torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu" in tv["fix"]
    assert tf["status"] == "FAIL" and "torchvision::nms" in tf["detail"] and "broken torchvision" in tf["detail"]
    assert all("the check itself crashed" not in c["detail"] for c in env["data"]["checks"])
    # without it on the path the same venv passes: test_full_run_on_this_machine


def test_a_killed_builds_lock_fails_a_zero_plan(tmp_path):
    """The real probe finds the FileBaton lock a killed DeepSpeed op build left (every later build of the op would
    wait for it forever): the deepspeed check FAILs with the rm command, exit 4."""
    lock = tmp_path / "ext" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    plan = _plan_file(tmp_path, strategy={"zero_stage": 2, "offload": "none", "launcher": "torchrun"},
                      ds_config={"zero_optimization": {"stage": 2}})
    p = _run(["preflight", "--plan", str(plan), "--json"], env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    ds = {c["name"]: c for c in _envelope(p)["data"]["checks"]}["deepspeed"]
    assert p.returncode == 4 and ds["status"] == "FAIL", ds
    assert str(lock) in ds["detail"] and "60 min ago" in ds["detail"] and ds["fix"].startswith(f"rm -f {lock}")
