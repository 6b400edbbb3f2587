"""A real two-node launch on localhost (issue: "Multi-node launches are only string-tested"): `vramplan run`
writes the run dir of a 2-node plan, then the two per-node `bash launch.sh K` commands run as two processes,
one CPU rank each (gloo), DeepSpeed ZeRO-2 on the tiny model. Both finish, with one verified final/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import checkpoint as ck
from vramplan.contract import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
             TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"):
        e.pop(k, None)
    return e


def zero2(world: int) -> dict:
    """Shaped like vramplan's generated config (vramplan/estimate/ds_config.py)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
            "gradient_clipping": 1.0, "steps_per_print": 1_000_000,
            "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}}}


def two_node_plan(tiny: Path, tmp: Path) -> Path:
    plan = {
        "schema": "vramplan-plan/1",
        "model": {"profile": None, "path": str(tiny / "model"), "chat_template": "llama3"},
        "recipe": {"name": "lora", "quant": "none", "compute_dtype": "fp32",
                   "llm_lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"}, "vision_lora": None,
                   "train_projector": True, "learning_rate": 5e-3, "max_steps": 2, "max_length": 128,
                   "save_steps": 2, "keep_checkpoints": 2, "seed": 3},
        "batch": {"micro_batch": 1, "grad_accum": 1, "global_batch": 2},
        "hardware": {"device": "cpu", "nodes": 2, "gpus_per_node": 1, "total_gpus": 2},
        "strategy": {"zero_stage": 2, "offload": "none", "launcher": "torchrun"},
        "ds_config": zero2(2),
        "data": {"dataset": str(tiny / "data.json"), "images": str(tiny / "images"), "samples": 16},
        "output_dir": str(tmp / "unused"),
        "estimate": {"checkpoint_bytes": 1_000_000},
    }
    p = tmp / "plan-2-nodes.json"
    p.write_text(json.dumps(plan))
    return p


def test_two_nodes_on_localhost_each_run_launch_sh(tiny, tmp_path, ds_ops):
    out = tmp_path / "run"
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "vramplan", "run", "--plan", str(two_node_plan(tiny, tmp_path)),
                        "--output", str(out), "--hosts", "127.0.0.1,127.0.0.1", "--master-port", str(port),
                        "--skip-preflight", "--json"], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["status"] == "commands_written", p.stderr
    sh = (out / "launch.sh").read_text()
    assert "--nnodes=2" in sh and "--master_addr=127.0.0.1" in sh and f"--master_port={port}" in sh

    logs = [open(tmp_path / f"node-{k}.log", "w") for k in (0, 1)]  # noqa: SIM115 - closed below
    nodes = [subprocess.Popen(["bash", str(out / "launch.sh"), str(k)], stdout=logs[k], stderr=subprocess.STDOUT,
                              env=env(), cwd=str(tmp_path)) for k in (0, 1)]
    codes: list = [None, None]
    try:
        codes = [n.wait(timeout=300) for n in nodes]
    except subprocess.TimeoutExpired:
        pass  # the assert below shows both nodes' logs
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
        for f in logs:
            f.close()
    tails = "\n".join((tmp_path / f"node-{k}.log").read_text()[-2500:] for k in (0, 1))
    assert codes == [0, 0], tails

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 2 and summary["world_size"] == 2, summary
    man = ck.verify(out / "final", deep=True)
    assert man and man["step"] == 2  # one final/, verified (MANIFEST sha256)
    assert not list(out.glob(f"{ck.FINAL_TMP_PREFIX}*"))  # no second, half-written export
    c = ck.verify(out / "checkpoints" / "checkpoint-2", deep=True)
    optim = [f for f in c["files"] if f.startswith("global_step2/") and "optim_states" in f]
    assert len(optim) == 2, c["files"].keys()  # both nodes' ZeRO-2 optimizer shards
