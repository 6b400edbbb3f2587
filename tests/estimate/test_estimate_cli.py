"""`vramplan estimate` end to end: the JSON contract, the field cases, bad input, import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CANDIDATE_KEYS = {"zero_stage", "offload", "gpus", "nodes", "micro_batch", "grad_accum", "grad_checkpointing",
                  "fits", "reasons", "vram_per_gpu_bytes", "vram_allocated_per_gpu_bytes", "vram_breakdown",
                  "cpu_ram_bytes", "disk_bytes", "checkpoint_bytes", "time_seconds", "ds_config"}
GiB = 2**30


def est(*args, check_code=None):
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "vramplan", "estimate", *args], capture_output=True, text=True,
                       timeout=120, env=env)
    if check_code is not None:
        assert p.returncode == check_code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


def est_json(*args, code=0):
    p = est(*args, "--json", check_code=code)
    env = json.loads(p.stdout)
    assert set(env) == {"schema", "command", "status", "exit_code", "data", "warnings", "errors"}
    assert env["schema"] == "vramplan/1" and env["command"] == "estimate" and env["exit_code"] == code
    return env


@pytest.fixture(scope="module")
def q24():
    return est_json("--gpus", "1x24G")["data"]


def test_contract_keys_pinned(q24):
    assert q24["candidates"], "no candidates"
    for c in q24["candidates"]:
        assert set(c) >= CANDIDATE_KEYS, CANDIDATE_KEYS - set(c)
        assert c["offload"] in ("none", "optimizer", "optimizer+params")
        assert isinstance(c["zero_stage"], int) and isinstance(c["fits"], bool)
        assert c["vram_per_gpu_bytes"] >= c["vram_allocated_per_gpu_bytes"] > 0
        assert sum(c["vram_breakdown"].values()) == pytest.approx(c["vram_per_gpu_bytes"], rel=0.001) or \
            c["vram_per_gpu_bytes"] >= c["vram_allocated_per_gpu_bytes"]
        assert c["fits"] == (not c["reasons"])
    assert isinstance(q24["pick"], int)


def test_llama3_qlora_on_24gb_needs_offload(q24):
    """The field case: ZeRO-2 OOMs on one 24 GB GPU; ZeRO-2 + optimizer offload fits."""
    z2 = [c for c in q24["candidates"] if c["zero_stage"] == 2 and c["offload"] == "none"]
    z2off = [c for c in q24["candidates"] if c["zero_stage"] == 2 and c["offload"] == "optimizer"]
    assert z2 and not any(c["fits"] for c in z2)
    assert any(c["fits"] for c in z2off)
    pick = q24["candidates"][q24["pick"]]
    assert pick["offload"] != "none"
    # r=512 LLM LoRA + r=64 ViT LoRA + projector: ~1.391 B trainable = 1,342,177,280
    # + 28,311,552 + 20,979,712 (XTuner's llava_*_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune.py ranks)
    assert q24["model"]["trainable_params"] == pytest.approx(1_391_468_544, rel=0.001)


def test_one_a100_80g_plain_zero2_fits():
    d = est_json("--gpus", "1x80G")["data"]
    assert any(c["fits"] for c in d["candidates"] if c["zero_stage"] == 2 and c["offload"] == "none")


def test_two_gpus_are_used():
    d = est_json("--gpus", "2x80G")["data"]
    assert d["candidates"][d["pick"]]["gpus"] == 2
    idle = [c for c in d["candidates"] if c["gpus"] == 1]
    assert idle and all(any("idle" in n for n in c["notes"]) for c in idle)


def test_disk_too_small_for_checkpoints():
    d = est_json("--gpus", "1x80G", "--disk", "45GB", code=3)["data"]
    assert d["pick"] is None
    assert all(any("disk" in r for r in c["reasons"]) for c in d["candidates"])
    c0 = d["candidates"][0]
    assert c0["disk_breakdown"]["checkpoints"] == 3 * c0["checkpoint_bytes"]  # keep 2 + the one being written


def test_ascend_pretrain_13b():
    d = est_json("--model", "llava-v1.5-13b", "--recipe", "pretrain", "--gpus", "8x910B")["data"]
    assert d["device"] == "npu" and d["quant"] == "none"
    pick = d["candidates"][d["pick"]]
    assert pick["gpus"] == 8
    assert d["model"]["trainable_params"] == pytest.approx(31_467_520, rel=0.01)  # projector only


def test_inference():
    d = est_json("--gpus", "1x24G", "--task", "infer", "--context", "4096")["data"]
    assert d["task"] == "infer" and d["pick"] is not None
    c = d["candidates"][d["pick"]]
    # fp16 LLaVA-Llama-3-8B is ~16.7 GB of weights: at 4096 tokens it fits one 24 GB card with headroom 10%
    assert c["dtype"] == "fp16" and c["gpus"] == 1 and d["pick_reason"]
    assert c["vram_breakdown"]["kv_cache"] == 2 * 32 * 1024 * 2 * 4096


def test_inference_human_output_names_the_dtype_and_why():
    p = est("--gpus", "1x24G", "--task", "infer", "--context", "8192", check_code=0)
    pick = [line for line in p.stdout.splitlines() if line.startswith("pick")]
    assert pick and "int8 weights on 1 GPU" in pick[0] and "fp16 does not fit" in pick[0]
    assert "VRAM total GiB" in p.stdout and "nf4" in p.stdout


def test_human_output_names_pick_and_units():
    p = est("--gpus", "1x24G", "--explain", check_code=0)
    assert "PICK" in p.stdout and "GiB" in p.stdout
    assert "activations_saved" in p.stdout  # --explain lists components with formulas


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "1x23G"], "23"),
    (["--gpus", "3xB300"], "B300"),
    (["--model", "llava-nope"], "llava-nope"),
    (["--model", "/no/such/dir/"], "/no/such/dir"),
    (["--gpus", "1x24G", "--cpu-ram", "64G"], "ambiguous"),
    (["--gpus", "1x24G", "--headroom", "2"], "--headroom"),
    (["--gpus", "1x24G", "--seq-len", "100"], "--seq-len"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    p = est(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines[0].startswith("vramplan: error:") and needle in lines[0], lines
    assert len(lines) <= 2  # the error and a hint


def test_save_plan(tmp_path):
    out = tmp_path / "plan.json"
    est_json("--gpus", "1x24G", "--save-plan", str(out))
    plan = json.loads(out.read_text())
    assert plan["schema"] == "vramplan-plan/1"
    assert plan["ds_config"]["zero_optimization"]["stage"] == plan["strategy"]["zero_stage"]
    assert plan["batch"]["micro_batch"] == plan["ds_config"]["train_micro_batch_size_per_gpu"]
    assert plan["estimate"]["checkpoint_bytes"] > 0


def test_estimate_path_imports_no_torch():
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from vramplan.cli import cli\n"
            "r = CliRunner().invoke(cli, ['estimate', '--gpus', '1x24G', '--json'])\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = {'torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("args", [["--gpus", "1x24G", "--task", "infer"],
                                  ["--gpus", "2x24G", "--task", "infer", "--quant", "none", "--context", "32768"],
                                  ["--gpus", "1x24G", "--disk", "45GB"],
                                  ["--gpus", "2x8xA100-80G", "--all"]])
def test_human_output_renders_without_traceback(args):
    p = est(*args)
    assert p.returncode in (0, 3), p.stderr
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr
    assert "GiB" in p.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from train.tiny import build

    return build(tmp_path_factory.mktemp("tiny-est"), samples=12, distinct=3)


def test_dataset_and_local_model_dir(tiny):
    d = est_json("--model", str(tiny / "model"), "--gpus", "1x24G", "--dataset", str(tiny / "data.json"),
                 "--images", str(tiny / "images"))["data"]
    assert d["samples"] == 12
    assert d["model"]["path"] == str((tiny / "model").resolve()) or d["model"]["path"].endswith("model")
    c = d["candidates"][d["pick"]]
    assert c["disk_breakdown"]["base_weights"] == 0  # a local dir is already on disk
    # --dataset is measured, and its files are on this machine already: reported, not charged as new disk
    assert c["disk_breakdown"]["dataset"] == 0 and c["disk_present"]["dataset"] > 0
    assert c["disk_present"]["base_weights"] > 0
    assert c["disk_sources"]["dataset"] == "measured" and c["disk_sources"]["base_weights"] == "measured"
    assert c["disk_bytes"] == sum(c["disk_breakdown"].values())
    assert c["checkpoint_saves"] == 1  # 12 samples: one save, at the last step


def test_dataset_errors_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = est("--gpus", "1x24G", "--dataset", str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "bad.json" in p.stderr
