"""DeepSpeed ZeRO-2, ZeRO-2 + optimizer offload and ZeRO-3 (+ NF4) under `torchrun --nproc_per_node=2` (gloo, CPU).

The first offload run JIT-builds DeepSpeed's cpu_adam (~30 s), cached in TORCH_EXTENSIONS_DIR (tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainhelpers import base_args, read_jsonl, run_train, train_env

from train import checkpoint as ck

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ds_ops")]


def _ds_config(stage: int, offload: bool = False, micro: int = 1, accum: int = 1, world: int = 2) -> dict:
    """Shaped like vramplan's generated config (vramplan/estimate/ds_config.py): explicit sizes, AdamW 'auto' params."""
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 640})
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * world, "gradient_clipping": 1.0, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}},
            "steps_per_print": 1_000_000}


def _check_run(out, steps: int, ranks: int = 2, saves=(2, 4)) -> None:
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "ok" and s["steps"] == steps and s["world_size"] == ranks
    assert len(s["peak_rss_bytes"]) == ranks and all(b > 0 for b in s["peak_rss_bytes"])
    for step in saves:
        c = out / "checkpoints" / f"checkpoint-{step}"
        man = ck.verify(c, deep=True)
        assert man and man["step"] == step
        optim = [f for f in man["files"] if f.startswith(f"global_step{step}/") and "optim_states" in f]
        assert len(optim) == ranks, man["files"].keys()  # every rank's optimizer shard is in the manifest
    events = read_jsonl(out / "metrics.jsonl")
    assert [e["step"] for e in events if e["event"] == "checkpoint"][-len(saves):] == list(saves)
    from safetensors.torch import load_file

    sd = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert sd and all(v.numel() > 0 for v in sd.values())  # gathered, not empty ZeRO-3 placeholders
    assert any(float(v.abs().sum()) > 0 for k, v in sd.items() if "lora_B" in k)  # trained


def test_zero2_from_plan_and_resume(tiny, tmp_path):
    out = tmp_path / "run"
    plan = {"schema": "vramplan-plan/1", "model": {"path": str(tiny / "model"), "chat_template": "llama3"},
            "recipe": {"name": "lora", "quant": "none", "compute_dtype": "fp32",
                       "llm_lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"},
                       "vision_lora": None, "train_projector": True, "learning_rate": 5e-3, "max_steps": 4,
                       "save_steps": 2, "keep_checkpoints": 2, "max_length": 256, "seed": 3},
            "batch": {"micro_batch": 1, "grad_accum": 1, "global_batch": 2},
            "hardware": {"device": "cpu", "total_gpus": 2}, "strategy": {"zero_stage": 2, "offload": "none"},
            "ds_config": _ds_config(2), "data": {"dataset": str(tiny / "data.json"), "images": str(tiny / "images")},
            "output_dir": str(out), "estimate": {"checkpoint_bytes": 1_000_000}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    p = run_train(["--plan", str(tmp_path / "plan.json")], torchrun=2, port=29641, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_run(out, 4)
    assert json.loads((out / "summary.json").read_text())["estimate"] == {"checkpoint_bytes": 1_000_000}
    p = run_train(
        ["--plan", str(tmp_path / "plan.json"), "--max-steps", "6", "--resume"], torchrun=2, port=29642, timeout=400
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "continuing from checkpoint-4" in p.stderr
    lines = read_jsonl(out / "metrics.jsonl")
    start = max(i for i, e in enumerate(lines) if e["event"] == "start")
    assert [e["step"] for e in lines[start:] if e["event"] == "step"] == [5, 6]
    _check_run(out, 6, saves=(4, 6))


def test_zero2_optimizer_offload(tiny, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "ds.json").write_text(json.dumps(_ds_config(2, offload=True)))
    p = run_train(base_args(tiny, out, "--recipe", "lora", "--max-steps", "4", "--save-steps", "2",
                            "--keep-checkpoints", "2",  # the lora recipe keeps 1; both saves are checked below
                            "--deepspeed", str(tmp_path / "ds.json")), torchrun=2, port=29643, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_run(out, 4)
    ext = Path(train_env()["TORCH_EXTENSIONS_DIR"])
    assert list(ext.rglob("cpu_adam*.so")), "offload ran without DeepSpeedCPUAdam (cpu_adam op)"


def test_zero3_qlora_nf4(tiny, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "ds.json").write_text(json.dumps(_ds_config(3)))
    p = run_train(base_args(tiny, out, "--recipe", "qlora", "--max-steps", "4", "--save-steps", "2",
                            "--deepspeed", str(tmp_path / "ds.json")), torchrun=2, port=29644, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_run(out, 4)
    man = ck.verify(out / "checkpoints" / "checkpoint-4")
    assert sum("model_states" in f for f in man["files"]) == 2  # ZeRO-3: one model-state shard per rank


def test_deepspeed_launcher_passes_local_rank(tiny, tmp_path):
    import subprocess
    import sys

    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("the deepspeed launcher script is not installed next to this Python")
    out = tmp_path / "run"
    (tmp_path / "ds.json").write_text(json.dumps(_ds_config(2)))
    env = train_env()
    env.pop("OMP_NUM_THREADS")  # the trainer itself must avoid thread oversubscription under this launcher
    p = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", "29645", "--module", "train",
                        *base_args(tiny, out, "--recipe", "lora", "--max-steps", "2", "--save-steps", "2",
                                   "--deepspeed", str(tmp_path / "ds.json"))],
                       capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    _check_run(out, 2, saves=(2,))


def test_zero2_pretrain_checkpoints_hold_only_the_projector(tiny, tmp_path):
    """Projector-only recipe under DeepSpeed: checkpoints exclude the frozen model (what the estimate's
    checkpoint size assumes) and still resume."""
    out = tmp_path / "run"
    plan = {"schema": "vramplan-plan/1", "model": {"path": str(tiny / "model"), "chat_template": "llama3"},
            "recipe": {"name": "pretrain", "quant": "none", "compute_dtype": "fp32", "llm_lora": None,
                       "vision_lora": None, "train_projector": True, "learning_rate": 1e-3, "max_steps": 2,
                       "save_steps": 2, "keep_checkpoints": 2, "max_length": 256, "seed": 3},
            "batch": {"micro_batch": 1, "grad_accum": 1, "global_batch": 2},
            "hardware": {"device": "cpu", "total_gpus": 2}, "strategy": {"zero_stage": 2, "offload": "none"},
            "ds_config": _ds_config(2), "data": {"dataset": str(tiny / "data.json"), "images": str(tiny / "images")},
            "output_dir": str(out), "estimate": {}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    p = run_train(["--plan", str(tmp_path / "plan.json")], torchrun=2, port=29647, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    man = ck.verify(out / "checkpoints" / "checkpoint-2", deep=True)
    states = [f for f in man["files"] if f.endswith("model_states.pt")]
    import torch

    sd = torch.load(out / "checkpoints" / "checkpoint-2" / states[0], map_location="cpu", weights_only=False)["module"]
    assert sd and all("multi_modal_projector" in k for k in sd), sorted(sd)[:5]  # no frozen weights
    p = run_train(["--plan", str(tmp_path / "plan.json"), "--max-steps", "3", "--resume"], torchrun=2, port=29648,
                  timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "continuing from checkpoint-2" in p.stderr
