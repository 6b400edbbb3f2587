"""Launch commands, environment and launch.sh built from hand-written plans (no trainer needed)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.errors import UsageError
from vramplan.run.launch import build_launch, render_launch_sh, write_launch_files


def make_plan(tmp: Path, *, device="cuda", nodes=1, per_node=1, launcher="python", zero=None,
              model_path=None) -> dict:
    """A minimal plan.json dict in the docs/contracts.md shape."""
    ds = {"zero_optimization": {"stage": zero}, "train_micro_batch_size_per_gpu": 1} if zero is not None else None
    return {
        "schema": "vramplan-plan/1",
        "model": {"profile": None if model_path else "llava-llama3-8b-instruct", "path": model_path,
                  "llm_path": None, "vision_path": None, "projector_path": None, "chat_template": "llama3"},
        "recipe": {"name": "qlora", "epochs": 1, "max_steps": None, "save_steps": 500, "keep_checkpoints": 2},
        "batch": {"micro_batch": 1, "grad_accum": 16, "global_batch": 16 * nodes * per_node},
        "hardware": {"device": device, "nodes": nodes, "gpus_per_node": per_node, "total_gpus": nodes * per_node},
        "strategy": {"zero_stage": zero or 0, "offload": "none", "launcher": launcher},
        "ds_config": ds,
        "data": {"dataset": str(tmp / "data.json"), "images": str(tmp / "images"), "samples": 160},
        "output_dir": str(tmp / "run"),
        "estimate": {"vram_per_gpu_bytes": 20 * 2**30, "vram_allocated_per_gpu_bytes": 18 * 2**30,
                     "cpu_ram_bytes": 30 * 2**30, "checkpoint_bytes": 2 * 2**30, "disk_bytes": 40 * 2**30,
                     "time_seconds": 3600.0},
    }


def test_single_process_cpu(tmp_path):
    plan = make_plan(tmp_path, device="cpu", model_path=str(tmp_path / "model"))
    la = build_launch(plan, tmp_path / "run" / "plan.json", cores=8, environ={})
    assert la.argv[:3] == (sys.executable, "-m", "train")
    assert la.argv[-2:] == ("--plan", "plan.json")  # run in the plan's dir: a moved run dir launches itself
    assert la.env["DS_ACCELERATOR"] == "cpu"
    assert la.env["HF_HUB_OFFLINE"] == "1"
    assert la.env["OMP_NUM_THREADS"] == "8"
    assert "RANK" not in la.env  # no DeepSpeed config: no process-group variables


def test_single_process_deepspeed_gets_process_group_env(tmp_path):
    plan = make_plan(tmp_path, zero=2)
    la = build_launch(plan, tmp_path / "plan.json", environ={})
    assert la.env["WORLD_SIZE"] == "1" and la.env["RANK"] == "0" and int(la.env["MASTER_PORT"]) > 0
    assert "HF_HUB_OFFLINE" not in la.env  # a Hub profile may need the network


def test_two_gpu_torchrun(tmp_path):
    plan = make_plan(tmp_path, per_node=2, launcher="torchrun", zero=2)
    la = build_launch(plan, tmp_path / "plan.json", cores=16, environ={}, resume=True)
    cmd = " ".join(la.argv)
    assert "--nproc_per_node=2" in cmd and "-m train --plan" in cmd and cmd.endswith("--resume")
    assert la.env["OMP_NUM_THREADS"] == "8"
    assert la.env["MKL_THREADING_LAYER"] == "GNU" and la.env["MKL_SERVICE_FORCE_INTEL"] == "1"
    assert la.env["NCCL_DEBUG"] == "WARN"
    assert "RANK" not in la.env  # torchrun sets them per process


def test_user_omp_threads_win(tmp_path):
    la = build_launch(make_plan(tmp_path, per_node=2, launcher="torchrun"), tmp_path / "p.json",
                      cores=16, environ={"OMP_NUM_THREADS": "3"})
    assert la.env["OMP_NUM_THREADS"] == "3"


def test_deepspeed_launcher_uses_module(tmp_path):
    la = build_launch(make_plan(tmp_path, per_node=4, launcher="deepspeed", zero=3), tmp_path / "p.json",
                      master_port=29777, environ={})
    argv = list(la.argv)
    assert "--num_gpus" in argv and argv[argv.index("--num_gpus") + 1] == "4"
    assert "--module" in argv and argv[argv.index("--module") + 1] == "train"
    assert argv[argv.index("--master_port") + 1] == "29777"


def test_python_launcher_with_many_gpus_becomes_torchrun(tmp_path):
    la = build_launch(make_plan(tmp_path, per_node=2, launcher="python"), tmp_path / "p.json", environ={})
    assert la.launcher == "torchrun"
    assert "--nproc_per_node=2" in " ".join(la.argv)


def test_multi_node_hostfile_and_per_node_commands(tmp_path):
    plan = make_plan(tmp_path, nodes=2, per_node=8, launcher="torchrun", zero=3)
    la = build_launch(plan, tmp_path / "run" / "plan.json", hosts=["gpu-a", "gpu-b"], environ={})
    assert la.hostfile == "gpu-a slots=8\ngpu-b slots=8\n"
    assert len(la.node_commands) == 2
    for rank, cmd in enumerate(la.node_commands):
        s = " ".join(cmd)
        assert f"--node_rank={rank}" in s and "--nnodes=2" in s and "--nproc_per_node=8" in s
        assert "--master_addr=gpu-a" in s
    written = write_launch_files(la, tmp_path / "run")
    assert {p.name for p in written} == {"launch.sh", "hostfile"}
    subprocess.run(["bash", "-n", str(tmp_path / "run" / "launch.sh")], check=True)


def test_multi_node_without_hosts_requires_master_addr(tmp_path):
    plan = make_plan(tmp_path, nodes=2, per_node=8, launcher="deepspeed", zero=2)
    la = build_launch(plan, tmp_path / "plan.json", environ={})
    text = render_launch_sh(la)
    assert "MASTER_ADDR:?" in text and '"--master_addr=${MASTER_ADDR}"' in text
    assert "--no_ssh" in la.node_commands[1] and "--node_rank=1" in la.node_commands[1]
    p = tmp_path / "launch.sh"
    p.write_text(text)
    r = subprocess.run(["bash", str(p), "0"], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert r.returncode != 0 and "MASTER_ADDR" in r.stderr


def test_hosts_count_must_match_nodes(tmp_path):
    with pytest.raises(UsageError, match="2 node"):
        build_launch(make_plan(tmp_path, nodes=2, per_node=8, launcher="torchrun"), tmp_path / "p.json",
                     hosts=["only-one"])


def test_bad_launcher_is_a_usage_error(tmp_path):
    plan = make_plan(tmp_path)
    plan["strategy"]["launcher"] = "mpirun"
    with pytest.raises(UsageError, match="launcher"):
        build_launch(plan, tmp_path / "p.json")


def test_launch_sh_runs_the_exact_command_and_env(tmp_path):
    """launch.sh is not just text: run it with a fake interpreter that prints what it got."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\necho "MKL=$MKL_THREADING_LAYER OMP=$OMP_NUM_THREADS '
                    'DS=$DS_ACCELERATOR"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    plan = make_plan(tmp_path, device="cpu")
    la = build_launch(plan, tmp_path / "run" / "plan.json", python=str(fake), cores=2, environ={})
    write_launch_files(la, tmp_path / "run")
    sh = tmp_path / "run" / "launch.sh"
    assert os.access(sh, os.X_OK)
    out = subprocess.run([str(sh)], capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    assert "ARGS -m train --plan plan.json" in out  # launch.sh cds to its own dir first
    assert "MKL=GNU OMP=2 DS=cpu" in out
