"""Fast unit tests of the run orchestration pieces (no trainer process)."""

from __future__ import annotations

import io
import json
import os
import time

import pytest
from test_launch import make_plan

from vramplan.contract import ENV_TEST_INJECT_OOM_AT_STEP, ENV_TEST_INJECT_OOM_ATTEMPTS
from vramplan.errors import UsageError
from vramplan.run import attempts as runner
from vramplan.run.launch import build_launch
from vramplan.run.progress import ProgressView, tail_events
from vramplan.units import fmt_bytes, fmt_clock, fmt_seconds


def test_one_formatter_of_each_kind():
    assert fmt_clock(12) == "0:12" and fmt_clock(5400) == "1:30:00" and fmt_clock(None) == "n/a"
    assert fmt_seconds(5400) == "1.5 h" and fmt_seconds(30) == "30 s"
    assert fmt_bytes(None) == "n/a" and fmt_bytes(2**29) == "512.00 MiB" and fmt_bytes(3 * 2**40) == "3.00 TiB"


def test_tail_events_waits_for_complete_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"event": "start", "max_steps": 4}\n{"event": "step", "st')
    events, off = tail_events(p, 0)
    assert events == [{"event": "start", "max_steps": 4}]
    with open(p, "a") as f:
        f.write('ep": 1}\nnot json\n')
    events, off2 = tail_events(p, off)
    assert events == [{"event": "step", "step": 1}] and off2 == p.stat().st_size
    assert tail_events(tmp_path / "missing", 0) == ([], 0)


def test_plain_progress_lines_when_not_a_tty(tmp_path):
    stream = io.StringIO()
    est = {"vram_per_gpu_bytes": 2**30}
    view = ProgressView(tmp_path, est, stream=stream, interval=0, tty=False, label="attempt 1")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"event": "step", "step": 2, "max_steps": 8, "loss": 1.5, "tokens_per_s": 100.0,
                    "elapsed_s": 4.0, "peak_reserved_bytes": [2**29], "device": "cuda"}) + "\n"
        + json.dumps({"event": "checkpoint", "step": 2, "bytes": 2048, "verified": True}) + "\n")
    state = view.close()
    out = stream.getvalue()
    assert state.step == 2 and state.eta_s() == pytest.approx(12.0)
    assert "step 2/8" in out and "loss 1.5000" in out and "VRAM 512.00 MiB (est 1.00 GiB)" in out
    assert "ETA 0:12" in out and "checkpoint at step 2" in out and "\r" not in out


def test_classify_uses_fresh_failure_json_over_exit_code(tmp_path):
    started = time.time()
    (tmp_path / "failure.json").write_text(json.dumps({"kind": "oom", "step": 1}))
    # torchrun reports a failed worker as exit 1; failure.json says what it was
    assert runner.classify(1, tmp_path, started, False)[0] == "oom"
    old = started - 3600
    os.utime(tmp_path / "failure.json", (old, old))
    assert runner.classify(1, tmp_path, started, False)[0] == "error"  # stale file from an earlier attempt
    assert runner.classify(7, tmp_path, started, False)[0] == "disk_full"
    assert runner.classify(0, tmp_path, started, False)[0] == "error"  # exit 0 without summary.json
    (tmp_path / "summary.json").write_text(json.dumps({"status": "ok"}))
    assert runner.classify(0, tmp_path, started, False)[0] == "ok"
    assert runner.classify(0, tmp_path, started, True)[0] == "interrupted"


def test_output_dir_guards(tmp_path):
    runner.check_output_dir(tmp_path / "new", resume=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "plan.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a run"):
        runner.check_output_dir(tmp_path / "old", resume=False)
    runner.check_output_dir(tmp_path / "old", resume=True)
    with pytest.raises(UsageError, match="no plan.json"):
        runner.check_output_dir(tmp_path / "new", resume=True)


def test_injected_oom_reaches_only_the_first_attempt(tmp_path, monkeypatch):
    la = build_launch(make_plan(tmp_path, device="cpu"), tmp_path / "plan.json", environ={})
    settings = runner.RunSettings(tmp_path)
    monkeypatch.setenv(ENV_TEST_INJECT_OOM_AT_STEP, "2")
    assert runner.trainer_env(la, settings, 1)[ENV_TEST_INJECT_OOM_AT_STEP] == "2"
    assert ENV_TEST_INJECT_OOM_AT_STEP not in runner.trainer_env(la, settings, 2)
    monkeypatch.setenv(ENV_TEST_INJECT_OOM_ATTEMPTS, "5")
    assert runner.trainer_env(la, settings, 3)[ENV_TEST_INJECT_OOM_AT_STEP] == "2"


def test_write_attempt_dir(tmp_path):
    plan = make_plan(tmp_path, device="cpu", per_node=2, launcher="torchrun", zero=2)
    la = runner.write_attempt_dir(plan, tmp_path / "run", runner.RunSettings(tmp_path / "run"), resume=False)
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert saved["output_dir"] == "."  # relative to the plan's dir (docs/run.md "Copying or moving a run dir")
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    sh = (tmp_path / "run" / "launch.sh").read_text()
    assert "--nproc_per_node=2" in sh and "export DS_ACCELERATOR=cpu" in sh and la.world_size == 2


def test_tty_progress_bar(tmp_path):
    stream = io.StringIO()
    view = ProgressView(tmp_path, {"vram_per_gpu_bytes": 2**30}, stream=stream, tty=True, label="attempt 1")
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"event": "step", "step": 3, "max_steps": 4, "loss": 0.5, "elapsed_s": 3.0,
                    "peak_reserved_bytes": [2**28], "device": "cuda"}) + "\n")
    view.close()
    out = stream.getvalue()
    assert "3/4" in out and "ETA 0:01" in out and "VRAM 256.00 MiB (est 1.00 GiB)" in out
