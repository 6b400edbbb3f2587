"""The file contract between planner and trainer: a plan vramplan writes is one the trainer accepts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _save_plan(tmp_path, *args) -> dict:
    data = tmp_path / "data.json"
    data.write_text("[]")
    out = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "vramplan", "estimate", "--json", "--save-plan", str(out),
                    "--dataset", str(data), "--output", str(tmp_path / "run"), *args],
                   check=True, capture_output=True, timeout=120)
    return json.loads(out.read_text())


@pytest.mark.parametrize("args", [("--gpus", "1x24G"), ("--gpus", "2x80G", "--recipe", "lora",
                                                         "--model", "llava-v1.5-13b")])
def test_trainer_reads_a_profile_plan(tmp_path, args):
    from train.config import from_plan

    plan = _save_plan(tmp_path, *args)
    cfg = from_plan(str(tmp_path / "plan.json"), {})
    assert cfg.model_path == plan["model"]["hf_ids"]["llava"]  # a profile plan names the HF-format repo
    r = plan["recipe"]
    assert cfg.recipe == r["name"] and cfg.quant == r["quant"] and cfg.compute_dtype == r["compute_dtype"]
    assert cfg.llm_lora.r == r["llm_lora"]["r"] and cfg.llm_lora.alpha == r["llm_lora"]["alpha"]
    assert (cfg.vision_lora is None) == (r["vision_lora"] is None)
    assert cfg.micro_batch == plan["batch"]["micro_batch"] and cfg.grad_accum == plan["batch"]["grad_accum"]
    assert cfg.ds_config == plan["ds_config"] and cfg.zero_stage == plan["strategy"]["zero_stage"]
    assert cfg.expected_checkpoint_bytes == plan["estimate"]["checkpoint_bytes"]
    assert cfg.max_length == r["max_length"] and cfg.save_steps == r["save_steps"]
