"""`vramplan run` CLI without training: dry runs, multi-node command printing, usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
