"""`vramplan run` end to end with the real bundled trainer on CPU (slow: each trains a tiny LLaVA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.contract import ENV_PROGRESS_INTERVAL, ENV_TEST_INJECT_OOM_AT_STEP

pytestmark = pytest.mark.slow

ENV = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", **{ENV_PROGRESS_INTERVAL: "0"})


def vramplan(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "vramplan", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "train.tiny", "--out", str(out)], check=True, capture_output=True,
                   env=ENV, timeout=120)
    return out


def tiny_plan(tiny: Path, tmp: Path, procs: int = 1, disk_bytes: int = 10**7) -> Path:
    """A plan.json (docs/contracts.md) for the tiny model on CPU, `procs` processes (torchrun when > 1)."""
    plan = {
        "schema": "vramplan-plan/1",
        "model": {"profile": None, "path": str(tiny / "model"), "llm_path": None, "vision_path": None,
                  "projector_path": None, "chat_template": "llama3"},
        "recipe": {"name": "qlora", "quant": "nf4", "double_quant": True, "compute_dtype": "fp32",
                   "llm_lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": "all-linear"}, "vision_lora": None,
                   "train_projector": True, "train_llm_full": False, "learning_rate": 2e-3, "epochs": 1,
                   "max_steps": 4, "max_length": 128, "image_tokens": 4, "gradient_checkpointing": True,
                   "save_steps": 2, "keep_checkpoints": 2, "seed": 1},
        "batch": {"micro_batch": 1, "grad_accum": 1, "global_batch": procs},
        "hardware": {"device": "cpu", "nodes": 1, "gpus_per_node": procs, "total_gpus": procs},
        "strategy": {"zero_stage": 0, "offload": "none", "launcher": "python" if procs == 1 else "torchrun"},
        "ds_config": None,
        "data": {"dataset": str(tiny / "data.json"), "images": str(tiny / "images"), "samples": 16},
        "output_dir": str(tmp / "unused"),
        "estimate": {"vram_per_gpu_bytes": 50 * 2**20, "vram_allocated_per_gpu_bytes": 40 * 2**20,
                     "cpu_ram_bytes": 2**30, "checkpoint_bytes": 400_000, "disk_bytes": disk_bytes,
                     "time_seconds": 10.0},
    }
    p = tmp / f"plan-{procs}.json"
    p.write_text(json.dumps(plan))
    return p


def verified_checkpoints(run_dir: Path) -> list[Path]:
    out = []
    for ck in sorted((run_dir / "checkpoints").glob("checkpoint-*")):
        manifest = json.loads((ck / "MANIFEST.json").read_text())
        assert manifest["complete"] is True
        for rel, meta in manifest["files"].items():
            assert (ck / rel).stat().st_size == meta["bytes"]
        out.append(ck)
    return out


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    p = vramplan("run", "--demo", "--output", str(out), "--epochs", "1", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    env = json.loads(p.stdout)
    assert env["status"] == "ok"
    assert verified_checkpoints(out)
    assert (out / "final" / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "final" / "projector.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    components = {r["component"] for r in summary["vs_estimate"]}
    assert {"cpu_process_memory", "checkpoint", "time_per_step"} <= components
    assert all(r["measured"] is not None for r in summary["vs_estimate"] if r["component"] != "disk")
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["vs_estimate"] == summary["vs_estimate"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["hardware"]["device"] == "cpu" and plan["model"]["path"].endswith("model")
    sh = (out / "launch.sh").read_text()
    assert "MKL_SERVICE_FORCE_INTEL=1" in sh and "HF_HUB_OFFLINE=1" in sh
    assert "step" in p.stderr and "checkpoint at step" in p.stderr  # plain progress lines (not a TTY)


def test_two_process_torchrun_gloo(tiny, tmp_path):
    out = tmp_path / "ddp"
    # preflight is covered by the demo and the FAIL test; skipped here to keep the suite fast
    p = vramplan("run", "--plan", str(tiny_plan(tiny, tmp_path, procs=2)), "--output", str(out), "--json",
                 "--skip-preflight")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(summary["peak_rss_bytes"]) == 2
    assert "--nproc_per_node=2" in (out / "launch.sh").read_text()
    assert verified_checkpoints(out) and (out / "final" / "adapter_model.safetensors").exists()


def test_preflight_fail_stops_before_launch(tiny, tmp_path):
    """The plan needs 10 PB of disk at the output dir: preflight FAILs, exit 4, nothing written or trained."""
    out = tmp_path / "nofit"
    p = vramplan("run", "--plan", str(tiny_plan(tiny, tmp_path, disk_bytes=10**16)), "--output", str(out), "--json")
    assert p.returncode == 4, p.stderr[-2000:]
    env = json.loads(p.stdout)
    assert env["status"] == "preflight_failed" and env["data"]["launched"] is False
    assert any(c["status"] == "FAIL" for c in env["data"]["preflight"])
    assert not (out / "plan.json").exists() and not (out / "checkpoints").exists()


def test_oom_on_first_attempt_falls_back(tiny, tmp_path):
    out = tmp_path / "oom"
    env = dict(ENV, **{ENV_TEST_INJECT_OOM_AT_STEP: "1"})
    p = vramplan("run", "--auto", "--model", str(tiny / "model"), "--device", "cpu", "--gpus", "1x16G",
                 "--dataset", str(tiny / "data.json"), "--images", str(tiny / "images"), "--global-batch", "4",
                 "--seq-len", "192", "--lora-r", "16", "--epochs", "1",
                 "--output", str(out), "--json", "--skip-preflight", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    attempts = json.loads((out / "attempts.json").read_text())["attempts"]
    assert [a["kind"] for a in attempts] == ["oom", "ok"]
    assert attempts[0]["dir"] == "." and attempts[1]["dir"] == "./attempt-2"  # relative to the run dir
    assert attempts[0]["plan"] != attempts[1]["plan"] and "out of memory" in attempts[1]["why"]
    assert json.loads((out / "failure.json").read_text())["kind"] == "oom"
    assert verified_checkpoints(out / "attempt-2")
    report = json.loads((out / "report.json").read_text())
    assert report["final_dir"] == "./attempt-2" and report["attempts"] == 2
