"""The attempt loop against a contract-following stand-in trainer (fast; the real trainer is in test_run_e2e).

The stand-in is a `train` package put first on PYTHONPATH. It follows docs/contracts.md: metrics.jsonl,
summary.json, failure.json, exit codes 0/6/130, `--resume`, and the test-only OOM switch. It lets
these tests drive the orchestration (fallback order, attempts.json, Ctrl-C forwarding, exit mapping)
in about a second each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import make_plan

from vramplan.contract import ENV_PROGRESS_INTERVAL, ENV_TEST_INJECT_OOM_AT_STEP, ENV_TEST_INJECT_OOM_ATTEMPTS
from vramplan.errors import ExitCode
from vramplan.run import attempts as runner
from vramplan.run.report import finish_report

STAND_IN = f"OOM_ENV = {ENV_TEST_INJECT_OOM_AT_STEP!r}  # the trainer's test-only OOM switch\n" + r'''
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
plan = json.loads(Path(args[args.index("--plan") + 1]).read_text())
out = Path(plan["output_dir"])
steps = int(os.environ.get("FAKE_STEPS", "4"))
delay = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
oom_at = int(os.environ.get(OOM_ENV, "0") or 0)
stop = []
rank = int(os.environ.get("RANK", "0"))
def on_signal(signum, frame):
    stop.append(signum)
    if len(stop) > 1:  # like the real trainer: a second signal means "abort now"
        if rank == 0:
            (out / "summary.json").write_text(json.dumps({"status": "aborted", "signals": stop}))
        os._exit(1)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
if rank != 0:  # only rank 0 writes (docs/contracts.md); the others wait for a signal or the end
    for _ in range(int(os.environ.get("FAKE_STEPS", "4"))):
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.05")))
        if stop:
            sys.exit(130)
    sys.exit(0)
metrics = open(out / "metrics.jsonl", "a")
def emit(**ev):
    metrics.write(json.dumps(ev) + "\n"); metrics.flush()
start = 0
if "--resume" in args:
    done = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    start = done[-1] if done else 0
emit(event="start", max_steps=steps, device="cpu", resumed_from=start)
print("stand-in trainer", plan["batch"], flush=True)
for step in range(start + 1, steps + 1):
    time.sleep(delay)
    if stop:
        (out / "summary.json").write_text(json.dumps({"status": "interrupted", "steps": step - 1, "signals": stop}))
        sys.exit(130)
    if step == int(os.environ.get("FAKE_DISK_FULL_AT", "0")):
        (out / "failure.json").write_text(json.dumps({"kind": "disk_full", "phase": "save", "step": step,
            "message": "No space left on device", "memory": {}, "exit_code": 7}))
        sys.exit(7)
    if step == oom_at:
        (out / "failure.json").write_text(json.dumps({"kind": "oom", "phase": "train", "step": step,
            "message": "CUDA out of memory (injected)", "memory": {"allocated_bytes": 123}, "exit_code": 6}))
        sys.exit(6)
    emit(event="step", step=step, max_steps=steps, loss=2.0 / step, tokens_per_s=100.0, elapsed_s=step * delay,
         rank=0, rss_bytes=10**8, device="cpu")
    ck = out / "checkpoints" / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "MANIFEST.json").write_text(json.dumps({"step": step, "complete": True}))
    emit(event="checkpoint", step=step, path=str(ck), bytes=100, verified=True)
if os.environ.get("FAKE_CRASH"):
    print("Traceback: something broke", flush=True)
    sys.exit(1)
(out / "final").mkdir(exist_ok=True)
(out / "final" / "adapter_model.safetensors").write_bytes(b"0" * 64)
(out / "summary.json").write_text(json.dumps({"status": "ok", "steps": steps, "train_seconds": steps * delay,
    "peak_rss_bytes": [10**8], "checkpoint_bytes": 100, "final_dir": str(out / "final"), "device": "cpu",
    "world_size": 1, "estimate": plan["estimate"]}))
emit(event="end", steps=steps)
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    pkg = tmp_path / "stand_in" / "train"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    return pkg.parent


def cpu_plan(tmp_path, micro=2, accum=2):
    plan = make_plan(tmp_path, device="cpu")
    plan["batch"] = {"micro_batch": micro, "grad_accum": accum, "global_batch": micro * accum}
    return plan


def settings(out, **kw):
    return runner.RunSettings(Path(out), progress_interval=0, plain_progress=True, **kw)


def test_oom_then_fallback_succeeds_and_both_attempts_recorded(tmp_path, stand_in, monkeypatch):
    monkeypatch.setenv(ENV_TEST_INJECT_OOM_AT_STEP, "2")
    out = tmp_path / "run"
    fallback = cpu_plan(tmp_path, micro=1, accum=4)
    outcome = runner.run_attempts(cpu_plan(tmp_path), settings(out), lambda p: [cpu_plan(tmp_path), fallback])
    assert outcome["exit_code"] == ExitCode.OK
    attempts = json.loads((out / "attempts.json").read_text())["attempts"]
    assert [a["kind"] for a in attempts] == ["oom", "ok"]
    assert attempts[1]["dir"] == "./attempt-2" and attempts[1]["plan"]["micro_batch"] == 1
    assert "out of memory in phase train at step 2" in attempts[1]["why"]  # the identical plan was skipped
    report = finish_report(out, outcome)
    assert report["final_dir"] == str(out / "attempt-2") and report["vs_estimate"]
    assert json.loads((out / "attempt-2" / "summary.json").read_text())["vs_estimate"]


def test_every_attempt_oom_gives_exit_6(tmp_path, stand_in, monkeypatch):
    monkeypatch.setenv(ENV_TEST_INJECT_OOM_AT_STEP, "1")
    monkeypatch.setenv(ENV_TEST_INJECT_OOM_ATTEMPTS, "99")
    out = tmp_path / "run"
    plans = [cpu_plan(tmp_path, micro=1, accum=4), cpu_plan(tmp_path, micro=4, accum=1)]
    outcome = runner.run_attempts(cpu_plan(tmp_path), settings(out, max_attempts=2), lambda p: plans)
    assert outcome["exit_code"] == ExitCode.OUT_OF_MEMORY and len(outcome["attempts"]) == 2


def test_crash_maps_to_train_failed_with_log_tail(tmp_path, stand_in, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH", "1")
    outcome = runner.run_attempts(cpu_plan(tmp_path), settings(tmp_path / "run"), lambda p: [])
    assert outcome["exit_code"] == ExitCode.TRAIN_FAILED and "something broke" in outcome["log_tail"]


def test_ctrl_c_is_forwarded_and_resume_continues(tmp_path, stand_in):
    """A real `vramplan run` process gets SIGINT: the trainer stops, exit 130, --resume finishes the run."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(cpu_plan(tmp_path)))
    out = tmp_path / "run"
    env = dict(os.environ, FAKE_STEPS="40", FAKE_STEP_SECONDS="0.1", **{ENV_PROGRESS_INTERVAL: "0"})
    cmd = [sys.executable, "-m", "vramplan", "run", "--plan", str(plan), "--output", str(out), "--skip-preflight"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not list((out / "checkpoints").glob("checkpoint-3")):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "stopping the trainer (SIGINT)" in err and "--resume" in err
    done = len(list((out / "checkpoints").glob("checkpoint-*")))
    assert 3 <= done < 40
    env["FAKE_STEP_SECONDS"] = "0.01"
    r = subprocess.run([sys.executable, "-m", "vramplan", "run", "--resume", "--output", str(out),
                        "--skip-preflight", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    attempts = json.loads(r.stdout)["data"]["attempts"]
    assert [a["kind"] for a in attempts] == ["interrupted", "ok"] and attempts[1]["resumed"]
    starts = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"start"' in line]
    assert starts[-1]["resumed_from"] == done
    r = subprocess.run([sys.executable, "-m", "vramplan", "run", "--resume", "--output", str(out), "--skip-preflight"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "already finished" in r.stderr


def test_disk_full_stops_without_fallback(tmp_path, stand_in, monkeypatch):
    monkeypatch.setenv("FAKE_DISK_FULL_AT", "3")
    calls = []
    outcome = runner.run_attempts(cpu_plan(tmp_path), settings(tmp_path / "run"), lambda p: calls.append(p) or [])
    assert outcome["exit_code"] == ExitCode.DISK_FULL and outcome["status"] == "disk_full"
    assert not calls and len(outcome["attempts"]) == 1  # a full disk is not fixed by another plan
    assert len(list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))) == 2


def test_ctrl_c_under_deepspeed_launcher_reaches_workers_once(tmp_path, stand_in):
    """deepspeed's launch.py SIGTERMs its workers itself: vramplan must not signal them a second time."""
    plan = make_plan(tmp_path, device="cpu", per_node=2, launcher="deepspeed")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "run"
    env = dict(os.environ, FAKE_STEPS="200", FAKE_STEP_SECONDS="0.1", DS_ACCELERATOR="cpu")
    p = subprocess.Popen([sys.executable, "-m", "vramplan", "run", "--plan", str(tmp_path / "plan.json"),
                          "--output", str(out), "--skip-preflight"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "checkpoints").glob("checkpoint-2")):
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and len(summary["signals"]) == 1, summary
