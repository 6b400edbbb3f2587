"""`vramplan run` CLI without training: dry runs, multi-node command printing, usage errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch import make_plan


def run_cli(*args, cwd=None, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "vramplan", "run", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def save(tmp_path, name, plan):
    p = tmp_path / name
    p.write_text(json.dumps(plan))
    return p


def test_dry_run_two_gpus_prints_two_processes_and_mkl_exports(tmp_path):
    plan = save(tmp_path, "plan.json", make_plan(tmp_path, per_node=2, launcher="torchrun", zero=2))
    out = tmp_path / "run"
    p = run_cli("--plan", str(plan), "--output", str(out), "--dry-run", "--skip-preflight")
    assert p.returncode == 0, p.stderr
    assert "--nproc_per_node=2" in p.stdout and "2 processes" in p.stdout
    assert "export MKL_SERVICE_FORCE_INTEL=1" in p.stdout and "export MKL_THREADING_LAYER=GNU" in p.stdout
    assert "export OMP_NUM_THREADS=" in p.stdout
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_json(tmp_path):
    plan = save(tmp_path, "plan.json", make_plan(tmp_path, per_node=4, launcher="deepspeed", zero=3))
    p = run_cli("--plan", str(plan), "--output", str(tmp_path / "r"), "--dry-run", "--skip-preflight", "--json")
    env = json.loads(p.stdout)
    assert p.returncode == 0 and env["status"] == "dry_run"
    la = env["data"]["launch"]
    assert la["world_size"] == 4 and "--module" in la["argv"] and la["env"]["MKL_THREADING_LAYER"] == "GNU"
    assert env["data"]["launch_sh"].startswith("#!/usr/bin/env bash")


def test_two_by_eight_prints_hostfile_and_per_node_commands(tmp_path):
    plan = save(tmp_path, "plan.json", make_plan(tmp_path, nodes=2, per_node=8, launcher="torchrun", zero=3))
    p = run_cli("--plan", str(plan), "--output", str(tmp_path / "d"), "--dry-run", "--skip-preflight")
    assert p.returncode == 0, p.stderr
    assert "node-0 slots=8" in p.stdout and "node-1 slots=8" in p.stdout
    assert "node 0:" in p.stdout and "--node_rank=0" in p.stdout and "--node_rank=1" in p.stdout
    assert "--nnodes=2" in p.stdout and "16 processes" in p.stdout
    # without --dry-run: the run dir is written (hostfile, launch.sh for every node) and nothing launched
    out = tmp_path / "multi"
    p = run_cli("--plan", str(plan), "--output", str(out), "--skip-preflight", "--hosts", "gpu-a,gpu-b", "--json")
    env = json.loads(p.stdout)
    assert p.returncode == 0 and env["status"] == "commands_written", p.stderr
    assert (out / "hostfile").read_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    assert "--master_addr=gpu-a" in (out / "launch.sh").read_text()
    assert not (out / "trainer.log").exists()


def test_nothing_fits_exits_3_and_writes_nothing(tmp_path):
    out = tmp_path / "nofit"
    p = run_cli("--auto", "--gpus", "1x16G", "--model", "llava-v1.5-13b", "--recipe", "full", "--cpu-ram", "8GiB",
                "--output", str(out), "--json")
    env = json.loads(p.stdout)
    assert p.returncode == 3 and env["errors"][0]["code"] == "no_fit", p.stderr
    assert not out.exists()


def test_usage_errors(tmp_path):
    p = run_cli("--output", str(tmp_path / "x"))
    assert p.returncode == 2 and "exactly one of" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("--plan", str(tmp_path / "missing.json"), "--output", str(tmp_path / "x"))
    assert p.returncode == 2 and "missing.json" in p.stderr
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    p = run_cli("--plan", str(tmp_path / "bad.json"), "--output", str(tmp_path / "x"), "--json")
    assert p.returncode == 2 and "not a vramplan plan" in json.loads(p.stdout)["errors"][0]["message"]
    p = run_cli("--resume", "--output", str(tmp_path / "nothing-here"))
    assert p.returncode == 2 and "no plan.json" in p.stderr
    plan = save(tmp_path, "p.json", make_plan(tmp_path, nodes=2, per_node=8, launcher="torchrun"))
    p = run_cli("--plan", str(plan), "--output", str(tmp_path / "y"), "--dry-run", "--skip-preflight",
                "--hosts", "only-one")
    assert p.returncode == 2 and "--hosts names 1 host" in p.stderr


def _json(p) -> dict:
    assert "Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout)


RUN_DIR_RE = r"llava-llama3-8b-instruct-qlora-\d{8}T\d{6}Z"


def test_auto_without_output_names_a_default_run_dir(tmp_path):
    p = run_cli("--auto", "--dry-run", "--skip-preflight", "--gpus", "1x24G", "--json", cwd=tmp_path)
    env = _json(p)
    assert p.returncode == 0 and env["status"] == "dry_run", p.stderr
    run_dir = Path(env["data"]["run_dir"])
    assert run_dir.parent == tmp_path.resolve() / "runs" and re.fullmatch(RUN_DIR_RE, run_dir.name), run_dir
    assert env["data"]["plan"]["output_dir"] == str(run_dir)
    first = p.stderr.splitlines()[0]  # said first, before anything else
    assert first.startswith("vramplan: run dir runs/") and run_dir.name in first
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_default_run_dir_name_is_a_safe_filename(tmp_path, monkeypatch):
    from datetime import datetime, timezone

    from vramplan.run.run_dir import default_run_dir, run_name

    monkeypatch.chdir(tmp_path)
    now = datetime(2026, 12, 1, 20, 30, tzinfo=timezone.utc)
    assert default_run_dir("llava-llama3-8b-instruct", "qlora", now) == \
        os.path.join("runs", "llava-llama3-8b-instruct-qlora-20261201T203000Z")
    (tmp_path / "runs" / "m-r-20261201T203000Z").mkdir(parents=True)
    assert default_run_dir("m", "r", now).endswith("m-r-20261201T203000Z-2")  # never reuse a dir
    model_dir = tmp_path / "my model (v2)"
    model_dir.mkdir()
    assert run_name(None, {"model": str(model_dir), "recipe": "lora"}) == ("my-model-v2", "lora")
    assert run_name({"model": {"profile": None, "path": "/x/tiny"}, "recipe": {"name": "full"}}, {}) == \
        ("tiny", "full")


def test_plan_without_output_dir_gets_the_default_run_dir(tmp_path):
    plan = make_plan(tmp_path, zero=2)
    kept = save(tmp_path, "kept.json", plan)
    p = run_cli("--plan", str(kept), "--dry-run", "--skip-preflight", "--json", cwd=tmp_path)
    assert _json(p)["data"]["run_dir"] == plan["output_dir"] and "run dir" not in p.stderr  # the plan's own
    bare = save(tmp_path, "bare.json", dict(plan, output_dir=None))
    p = run_cli("--plan", str(bare), "--dry-run", "--skip-preflight", "--json", cwd=tmp_path)
    run_dir = Path(_json(p)["data"]["run_dir"])
    assert run_dir.parent == tmp_path.resolve() / "runs" and re.fullmatch(RUN_DIR_RE, run_dir.name), run_dir


def test_no_gpu_error_names_gpus_and_demo(tmp_path):
    from vramplan.inputs.gpus import detect_local_gpus

    if detect_local_gpus() is not None:
        pytest.skip("this host has GPUs/NPUs: `run --auto` would plan for them")
    p = run_cli("--auto", "--dry-run", cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("vramplan: error: no GPU or NPU") and "--gpus" in lines[0] and "--demo" in lines[0]
    assert len(lines) <= 2 and not (tmp_path / "runs").exists()


def test_resume_without_output_says_it_needs_output(tmp_path):
    p = run_cli("--resume", cwd=tmp_path)
    assert p.returncode == 2 and "--resume needs --output" in p.stderr and "Traceback" not in p.stderr


def _failing_plan(tmp_path) -> Path:
    """A plan whose disk need no machine has: the disk-space check FAILs wherever the test runs."""
    plan = make_plan(tmp_path, per_node=2, launcher="torchrun", zero=2)
    plan["estimate"]["disk_breakdown"] = {"checkpoints": 10**18}
    return save(tmp_path, "huge.json", plan)


def test_dry_run_shows_the_launch_even_when_preflight_fails(tmp_path):
    out = tmp_path / "r"
    p = run_cli("--plan", str(_failing_plan(tmp_path)), "--output", str(out), "--dry-run")
    assert p.returncode == 4, p.stderr
    assert "#!/usr/bin/env bash" in p.stdout and "--nproc_per_node=2" in p.stdout
    launch_at, preflight_at = p.stdout.index("--- launch.sh"), p.stdout.index("--- preflight on this machine")
    assert launch_at < preflight_at and "disk-space" in p.stdout[preflight_at:]  # the plan first, then preflight
    assert "preflight failed" in p.stderr and "--skip-preflight" in p.stderr and "another machine" in p.stderr
    assert not out.exists()


def test_dry_run_json_has_plan_and_launch_when_preflight_fails(tmp_path, monkeypatch):
    """In process, preflight forced to FAIL: the envelope data of the dry run still has plan and launch."""
    from vramplan.commands import run as run_cmd

    monkeypatch.setattr(run_cmd, "_preflight", lambda plan, out, env: [
        {"name": "disk-space", "status": "FAIL", "detail": "forced", "fix": ""},
        {"name": "cpu-ram", "status": "PASS", "detail": "ok", "fix": ""}])
    plan = json.loads(_failing_plan(tmp_path).read_text())
    kw = dict(mode="plan", plan_file=str(save(tmp_path, "p.json", plan)), output=str(tmp_path / "r"),
              estimate_kwargs={}, max_attempts=1, skip_preflight=False, hosts=(), node_rank=None,
              master_port=None, json_mode=True)
    res = run_cmd.execute(dry_run=True, **kw)
    assert res.exit_code == 4 and res.status == "preflight_failed"
    assert res.data["plan"]["strategy"]["zero_stage"] == 2 and res.data["launch"]["world_size"] == 2
    assert res.data["launch_sh"].startswith("#!/usr/bin/env bash") and res.data["launched"] is False
    assert [c["name"] for c in res.data["preflight"]] == ["disk-space", "cpu-ram"]
    assert "--skip-preflight" in res.errors[0]["hint"] and "another machine" in res.errors[0]["hint"]
    real = run_cmd.execute(dry_run=False, **kw)  # without --dry-run: refused before writing anything
    assert real.exit_code == 4 and "launch" not in real.data and not (tmp_path / "r").exists()
