"""End-to-end trainer runs on CPU: QLoRA NF4 learns and its adapter reloads in a fresh process; OOM -> 6;
disk full -> 7 with the last checkpoint intact; kill -9 then --resume; SIGINT -> 130; bad data -> 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from trainhelpers import REPO, base_args, read_jsonl, run_train, train_env

from train import checkpoint as ck
from vramplan.contract import ENV_TEST_FREE_BYTES, ENV_TEST_INJECT_OOM_AT_STEP


def _batch(tiny, tok, ip, model_cfg):
    from pathlib import Path

    from train import data as D

    tiny = Path(tiny)
    recs = D.load_records(str(tiny / "data.json"), str(tiny / "images"))
    ds = D.LlavaDataset(recs, tok, ip, "llama3", model_cfg.image_token_index, model_cfg.image_seq_length, 512,
                        str(tiny / "images"))
    return D.collate([ds[0], ds[1]], tok.pad_token_id)


RELOAD = r"""
import sys, torch
from train.config import TrainConfig, LoraSpec
from train.export import load_for_inference
from test_train_runs import _batch as batch
tiny, final, out = sys.argv[1:4]
cfg = TrainConfig(output_dir=out, dataset=tiny + "/data.json", model_path=tiny + "/model", recipe="qlora",
                  quant="nf4", compute_dtype="bf16")
model, tok, ip = load_for_inference(tiny + "/model", final, cfg)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as in training (accelerate's bf16 autocast)
    logits = model(**batch(tiny, tok, ip, model.config)).logits.float()
torch.save(logits, out + "/logits.pt")
"""


def test_qlora_nf4_learns_and_adapter_reloads_in_fresh_process(tiny, tmp_path):
    import torch

    from train.config import LoraSpec, TrainConfig
    from train.training import run

    out = tmp_path / "run"
    cfg = TrainConfig(output_dir=str(out), dataset=str(tiny / "data.json"), images=str(tiny / "images"),
                      model_path=str(tiny / "model"), recipe="qlora", quant="nf4", compute_dtype="bf16",
                      llm_lora=LoraSpec(16, 32, 0.0), vision_lora=LoraSpec(4, 8, 0.0, ("q_proj", "fc1")),
                      learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", max_steps=10, micro_batch=2,
                      save_steps=5, keep_checkpoints=2, seed=1)
    code, model = run(cfg)
    assert code == 0
    steps = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 11))
    first, last = sum(e["loss"] for e in steps[:2]) / 2, sum(e["loss"] for e in steps[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    assert all(e["tokens_per_s"] > 0 and e["peak_rss_bytes"][0] > 0 for e in steps)
    # the LLM really is 4-bit, the vision tower and projector are not
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert any(k.endswith("language_model.layers.0.self_attn.q_proj.base_layer") and v == "Linear4bit"
               for k, v in kinds.items())
    assert not any("vision_tower" in k and v == "Linear4bit" for k, v in kinds.items())
    # checkpoints verified, final dir per contract
    for name in ("checkpoint-5", "checkpoint-10"):
        assert ck.verify(out / "checkpoints" / name)
    final = out / "final"
    assert ck.verify(final)["files"].keys() >= {"adapter_model.safetensors", "vision_adapter/adapter_model.safetensors",
                                                 "projector.safetensors"}
    vision_cfg = json.loads((final / "vision_adapter" / "adapter_config.json").read_text())
    llm_cfg = json.loads((final / "adapter_config.json").read_text())
    assert (vision_cfg["r"], vision_cfg["lora_alpha"], llm_cfg["r"], llm_cfg["lora_alpha"]) == (4, 8, 16, 32)
    from safetensors.torch import load_file

    proj = load_file(str(final / "projector.safetensors"))
    assert set(proj) == {f"multi_modal_projector.linear_{i}.{n}" for i in (1, 2) for n in ("weight", "bias")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 10 and summary["checkpoint_bytes"] > 0
    # same logits from base + adapters + projector loaded in a fresh process
    from transformers import AutoImageProcessor, AutoTokenizer

    tok, ip = AutoTokenizer.from_pretrained(tiny / "model"), AutoImageProcessor.from_pretrained(tiny / "model")
    model.eval()
    with torch.no_grad():
        ref = model(**_batch(tiny, tok, ip, model.config)).logits.float()
    env = train_env(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests' / 'train'}")
    p = subprocess.run([sys.executable, "-c", RELOAD, str(tiny), str(final), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = torch.load(tmp_path / "logits.pt")
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3), (got - ref).abs().max()


@pytest.mark.slow
def test_oom_injection_exit_6_with_failure_record(tiny, tmp_path):
    out = tmp_path / "run"
    p = run_train(base_args(tiny, out, "--max-steps", "5", "--save-steps", "10"),
                  env=train_env(**{ENV_TEST_INJECT_OOM_AT_STEP: 3}))
    assert p.returncode == 6, p.stderr[-2000:]
    f = json.loads((out / "failure.json").read_text())
    assert f["kind"] == "oom" and f["phase"] == "train" and f["step"] == 2 and f["exit_code"] == 6
    assert f["memory"]["rss_bytes"] > 0 and "OutOfMemoryError" in f["message"]
    assert json.loads((out / "summary.json").read_text())["status"] == "oom"
    assert "out of memory" in p.stderr


@pytest.mark.slow
def test_disk_full_exit_7_keeps_last_checkpoint(tiny, tmp_path):
    """Free space (test hook) is too small for the 2nd checkpoint: exit 7, checkpoint-2 intact, no 'saved' for 4."""
    out = tmp_path / "run"
    p = run_train(base_args(tiny, out, "--max-steps", "6", "--save-steps", "2", "--keep-checkpoints", "1"),
                  env=train_env(**{ENV_TEST_FREE_BYTES: 10_000}))
    # the first save has no expected size (no plan estimate, no earlier checkpoint); the second uses the first's size
    assert p.returncode == 7, p.stderr[-2000:]
    f = json.loads((out / "failure.json").read_text())
    assert f["kind"] == "disk_full" and f["phase"] == "save" and f["step"] == 4 and f["exit_code"] == 7
    assert "not enough disk space" in f["message"] and "checkpoint-2" in f["message"]
    assert ck.verify(out / "checkpoints" / "checkpoint-2")
    assert [p_.name for _s, p_ in ck.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert not list((out / "checkpoints").glob(ck.TMP_PREFIX + "*"))
    assert "saved checkpoint-2" in p.stderr and "saved checkpoint-4" not in p.stderr
    events = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "checkpoint"]
    assert [e["step"] for e in events] == [2]
    assert json.loads((out / "summary.json").read_text())["status"] == "disk_full"


@pytest.mark.slow
def test_plan_expected_size_too_big_fails_before_writing(tiny, tmp_path):
    out = tmp_path / "run"
    p = run_train(base_args(tiny, out, "--max-steps", "3", "--save-steps", "2",
                            "--expected-checkpoint-bytes", str(2**62)))
    assert p.returncode == 7
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    assert "train: " not in p.stdout and "hint:" in p.stderr


@pytest.mark.slow
def test_kill9_then_resume_from_newest_verified(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", *base_args(tiny, out, "--max-steps", "400", "--save-steps", "2",
                                                      "--keep-checkpoints", "2")]
    proc = subprocess.Popen(cmd, env=train_env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and sum(e["event"] == "checkpoint" for e in read_jsonl(metrics)) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    good, _ = ck.newest_verified(out / "checkpoints")
    assert good is not None
    n = int(good.name.split("-")[1])
    # plant a newer corrupt checkpoint (bytes flipped, same size) and a partial tmp dir: both must be skipped
    import shutil

    bad = out / "checkpoints" / f"checkpoint-{n + 1000}"
    shutil.copytree(good, bad)
    target = bad / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    (out / "checkpoints" / f"{ck.TMP_PREFIX}{n + 2000}-dead").mkdir()
    p = run_train(base_args(tiny, out, "--max-steps", str(n + 2), "--save-steps", "2", "--keep-checkpoints", "2",
                            "--resume"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"skipping checkpoint-{n + 1000}" in p.stderr and f"continuing from checkpoint-{n}" in p.stderr
    lines = read_jsonl(metrics)
    start = max(i for i, e in enumerate(lines) if e["event"] == "start")
    assert lines[start]["step"] == n
    assert [e["step"] for e in lines[start:] if e["event"] == "step"] == [n + 1, n + 2]
    assert not bad.exists()  # unverified leftovers are removed after the next verified save
    assert json.loads((out / "summary.json").read_text())["steps"] == n + 2


@pytest.mark.slow
def test_sigint_stops_at_step_boundary_exit_130(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", *base_args(tiny, out, "--max-steps", "400", "--save-steps", "2")]
    proc = subprocess.Popen(cmd, env=train_env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and any(e["event"] == "checkpoint"
                                                                    for e in read_jsonl(metrics))):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    s = json.loads((out / "summary.json").read_text())
    f = json.loads((out / "failure.json").read_text())
    assert s["status"] == "interrupted" and f["kind"] == "interrupted" and 0 < s["steps"] < 400
    good, _ = ck.newest_verified(out / "checkpoints")
    assert good is not None and not list((out / "checkpoints").glob(ck.TMP_PREFIX + "*"))


@pytest.mark.slow
def test_bad_dataset_record_exit_2_one_line(tiny, tmp_path):
    recs = json.loads((tiny / "data.json").read_text())
    recs[3] = {"id": "broken-3", "image": "missing.png", "conversations": [{"from": "gpt", "value": "x"}]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    args = base_args(tiny, tmp_path / "run", "--max-steps", "2")
    args[args.index("--dataset") + 1] = str(bad)
    p = run_train(args)
    assert p.returncode == 2
    line = next(x for x in p.stderr.splitlines() if "dataset record 3 (id 'broken-3'): " in x)
    # every problem of the record on its one line (the rules vramplan preflight applies too)
    assert "turn 0 is 'gpt'" in line and "image 'missing.png' not found" in line
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_cli_usage_errors_exit_2(tiny, tmp_path):
    p = run_train(["--dataset", str(tiny / "data.json"), "--output", str(tmp_path)])
    assert p.returncode == 2 and "train: error: --model: no model given" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_assembly_from_parts_trains_via_cli(tiny, tmp_path):
    out = tmp_path / "run"
    p = run_train(["--llm", str(tiny / "parts" / "llm"), "--vision", str(tiny / "parts" / "clip"),
                   "--projector", str(tiny / "parts" / "projector_xtuner.pth"), "--dataset", str(tiny / "data.json"),
                   "--images", str(tiny / "images"), "--output", str(out), "--recipe", "pretrain",
                   "--compute-dtype", "fp32", "--max-steps", "2", "--save-steps", "2"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "assembled-model" / "ASSEMBLED").exists() and ck.verify(out / "checkpoints" / "checkpoint-2")
    assert (out / "final" / "projector.safetensors").exists() and not (out / "final" / "adapter_config.json").exists()
    files = set(ck.verify(out / "checkpoints" / "checkpoint-2")["files"])
    assert "trainable.safetensors" in files and "model.safetensors" not in files  # projector only, not the LLM
    from safetensors.torch import load_file

    assert all("multi_modal_projector" in k for k in load_file(str(out / "checkpoints" / "checkpoint-2" /
                                                                   "trainable.safetensors")))
    p = run_train(["--llm", str(tiny / "parts" / "llm"), "--vision", str(tiny / "parts" / "clip"),
                   "--dataset", str(tiny / "data.json"), "--images", str(tiny / "images"), "--output", str(out),
                   "--recipe", "pretrain", "--compute-dtype", "fp32", "--max-steps", "3", "--save-steps", "2",
                   "--resume"])
    assert p.returncode == 0 and "continuing from checkpoint-2" in p.stderr, p.stderr[-2000:]


@pytest.fixture
def small_fs(tmp_path):
    """A real 2.5 MiB filesystem (tmpfs), room for one tiny checkpoint but not two. Needs mount rights."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {p.stderr.strip()[:100]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_real_enospc_during_write_exit_7_keeps_last_checkpoint(tiny, small_fs):
    """The free-space check is fooled (expected size 1 byte), so the 2nd save really hits ENOSPC mid-write.
    A small LoRA (r64, no CLIP LoRA) keeps one checkpoint within the 2.5 MiB filesystem."""
    out = small_fs / "run"
    p = run_train(base_args(tiny, out, "--max-steps", "6", "--save-steps", "2", "--keep-checkpoints", "1",
                            "--expected-checkpoint-bytes", "1", "--lora-r", "64", "--vision-lora-r", "0"))
    assert p.returncode == 7, p.stderr[-2000:]
    f = json.loads((out / "failure.json").read_text())
    assert f["kind"] == "disk_full" and f["phase"] == "save" and f["step"] == 4
    assert [c.name for _s, c in ck.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert ck.verify(out / "checkpoints" / "checkpoint-2")
    assert not list((out / "checkpoints").glob(ck.TMP_PREFIX + "*"))  # the partial write was removed
    assert "saved checkpoint-2" in p.stderr and "saved checkpoint-4" not in p.stderr
