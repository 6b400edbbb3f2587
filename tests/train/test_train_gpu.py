"""GPU-only: real CUDA bitsandbytes 4-bit kernels and measured peak memory (skipped without a CUDA GPU)."""

from __future__ import annotations

import json

import pytest
from trainhelpers import base_args, read_jsonl, run_train, train_env

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_cuda_qlora_nf4_records_peak_memory(tiny, tmp_path):
    out = tmp_path / "run"
    args = base_args(tiny, out, "--recipe", "qlora", "--max-steps", "4", "--save-steps", "2", "--device", "cuda")
    args[args.index("--compute-dtype") + 1] = "bf16"
    env = train_env()
    env.pop("DS_ACCELERATOR", None)
    p = run_train(args, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == "cuda" and s["status"] == "ok"
    alloc, res = s["peak_allocated_bytes"][0], s["peak_reserved_bytes"][0]
    assert 0 < alloc <= res < 2**30  # a ~300k-parameter model: well under 1 GiB
    steps = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "step"]
    assert all(e["device"] == "cuda" and e["peak_allocated_bytes"][0] > 0 for e in steps)


def test_cuda_4bit_layers_and_reload(tiny, tmp_path):
    import torch

    from train.config import LoraSpec, TrainConfig
    from train.training import run

    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(tiny / "data.json"), images=str(tiny / "images"),
                      model_path=str(tiny / "model"), recipe="qlora", quant="nf4", compute_dtype="bf16",
                      llm_lora=LoraSpec(8, 16, 0.0), max_steps=3, save_steps=3, device="cuda")
    code, model = run(cfg)
    assert code == 0
    q = [m for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert q and all(m.weight.device.type == "cuda" for m in q)
    assert torch.cuda.max_memory_allocated() > 0
