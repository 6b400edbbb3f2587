"""A run dir copied (`cp -r`) or moved (`mv`) resumes and calibrates where it is now (issue: "Run dirs
cannot be copied or moved"); old run dirs with absolute paths still load; wrong types in its files are exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_run_e2e import tiny_plan

from vramplan.contract import ENV_PROGRESS_INTERVAL, ENV_TEST_INJECT_OOM_AT_STEP, read_plan
from vramplan.run import relocate

from . import figures

ENV = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", **{ENV_PROGRESS_INTERVAL: "0"})
STORED = ("attempts.json", "plan.json", "launch.sh", "report.json", "summary.json", "metrics.jsonl")


def vramplan(*args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "vramplan", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


# ---- fast: the path rules ----------------------------------------------------------------------------------

def test_paths_inside_the_run_dir_are_stored_relative(tmp_path):
    root = tmp_path / "run"
    plan = {"output_dir": str(root / "attempt-2"), "data": {"dataset": str(root / "assets" / "d.json"),
                                                           "images": str(tmp_path / "images")},
            "model": {"path": str(root / "assets" / "model"), "profile": "x"}, "options": {"model": "llava-7b"}}
    saved = relocate.plan_stored(plan, root / "attempt-2", root)
    assert saved["output_dir"] == "." and saved["data"]["dataset"] == "../assets/d.json"
    assert saved["model"]["path"] == "../assets/model"
    assert saved["data"]["images"] == str(tmp_path / "images")  # outside the run dir: absolute as given
    assert saved["options"]["model"] == "llava-7b"  # a profile id is no path
    moved = tmp_path / "elsewhere"
    (moved / "attempt-2").mkdir(parents=True)
    (moved / "attempt-2" / "plan.json").write_text(json.dumps(dict(saved, schema="vramplan-plan/1")))
    back = read_plan(moved / "attempt-2" / "plan.json")  # the trainer's and `--plan`'s reader
    assert back["output_dir"] == str(moved / "attempt-2") and back["model"]["path"] == str(moved / "assets" / "model")


def test_old_absolute_paths_map_to_where_the_dir_is_now(tmp_path):
    old, new = Path("/gone/runs/a"), tmp_path / "a"
    attempts = [{"attempt": 1, "dir": str(old)}, {"attempt": 2, "dir": str(old / "attempt-2")}]
    here = relocate.attempts_here(new, attempts)
    assert [a["dir"] for a in here] == [str(new), str(new / "attempt-2")]
    plan = {"output_dir": str(old / "attempt-2"), "model": {"path": str(old / "demo-assets" / "model")},
            "data": {"dataset": "/data/d.json"}}
    live = relocate.plan_here(plan, new / "attempt-2", new, relocate.old_location(new, attempts))
    assert live["output_dir"] == str(new / "attempt-2")
    assert live["model"]["path"] == str(new / "demo-assets" / "model") and live["data"]["dataset"] == "/data/d.json"
    assert [a["dir"] for a in relocate.attempts_stored(new, here)] == [".", "./attempt-2"]


@pytest.mark.parametrize("name, text, field", [
    ("summary.json", {"status": "ok", "steps": "four"}, "steps"),
    ("summary.json", {"status": "ok", "peak_rss_bytes": "big"}, "peak_rss_bytes"),
    ("summary.json", [1, 2], "must be a JSON object"),
    ("attempts.json", {"attempts": "one"}, "attempts"),
    ("attempts.json", {"attempts": [{"attempt": 1, "dir": 5}]}, "attempts[0].dir"),
    ("attempts.json", {"attempts": [7]}, "attempts[0]"),
    ("attempts.json", {"attempts": [{"attempt": 1, "kind": "ok"}]}, "attempts[0].dir"),
    ("attempts.json", {"attempts": [{"attempt": 1.5, "dir": "."}]}, "attempts[0].attempt"),
])
def test_calibrate_wrong_types_exit_2_naming_file_and_field(tmp_path, name, text, field):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "ok", "steps": 4}))
    (run / name).write_text(json.dumps(text))
    p = vramplan("calibrate", str(run))
    figures.tally("inputs_fuzzed")
    figures.exit_code(p.returncode)
    assert p.returncode == 2, p.stderr
    assert name in p.stderr and field in p.stderr and "Traceback" not in p.stderr


def test_calibrate_summary_nested_too_deeply_exit_2(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("[" * 200_000 + "]" * 200_000)
    p = vramplan("calibrate", str(run))
    figures.tally("inputs_fuzzed")
    figures.exit_code(p.returncode)
    assert p.returncode == 2 and "summary.json" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_resume_wrong_types_in_attempts_exit_2(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps({"schema": "vramplan-plan/1"}))
    (run / "attempts.json").write_text(json.dumps({"attempts": [{"attempt": 1, "dir": ["x"]}]}))
    p = vramplan("run", "--resume", "--output", str(run))
    figures.exit_code(p.returncode)
    assert p.returncode == 2 and "attempts.json" in p.stderr and "attempts[0].dir" in p.stderr, p.stderr


# ---- slow: a real tiny run, copied and moved ----------------------------------------------------------------

@pytest.mark.slow
def test_copy_resumes_into_itself_and_a_moved_dir_calibrates(tiny, tmp_path):
    orig = tmp_path / "orig"
    # attempt 1 stops with an OOM at step 3 (checkpoint-2 is verified): an unfinished run to copy
    p = vramplan("run", "--plan", str(tiny_plan(tiny, tmp_path)), "--output", str(orig), "--skip-preflight",
                 "--max-attempts", "1", env=dict(ENV, **{ENV_TEST_INJECT_OOM_AT_STEP: "3"}))
    figures.tally("faults_injected")
    assert p.returncode == 6, p.stderr[-3000:]
    assert (orig / "checkpoints" / "checkpoint-2").is_dir() and not (orig / "final").exists()
    for name in STORED:  # nothing in the run dir names where it is
        if (orig / name).exists():
            assert str(orig) not in (orig / name).read_text(), name

    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    before = snapshot(orig)
    p = vramplan("run", "--resume", "--output", str(copy), "--skip-preflight")
    assert p.returncode == 0, p.stderr[-3000:]
    assert snapshot(orig) == before, "the original run dir was written to"
    assert (copy / "final" / "adapter_model.safetensors").exists()
    assert json.loads((copy / "summary.json").read_text())["steps"] == 4
    assert "--resume: continuing from checkpoint-2" in (copy / "trainer.log").read_text()
    for name in STORED:
        assert str(orig) not in (copy / name).read_text() and str(copy) not in (copy / name).read_text(), name
    figures.tally("runs_recovered")

    moved = tmp_path / "moved"
    copy.rename(moved)
    p = vramplan("calibrate", str(moved), "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    runs = json.loads(p.stdout)["data"]["runs"]
    assert [r["status"] for r in runs] == ["ok"] and runs[0]["dir"] == str(moved)
    assert any(row["measured"] is not None for row in runs[0]["components"])


@pytest.mark.slow
def test_old_run_dir_with_absolute_paths_resumes_where_it_is(tiny, tmp_path):
    """A run dir written before paths were relative: its absolute paths name the old place."""
    old = tmp_path / "old"
    p = vramplan("run", "--plan", str(tiny_plan(tiny, tmp_path)), "--output", str(old), "--skip-preflight",
                 "--max-attempts", "1", env=dict(ENV, **{ENV_TEST_INJECT_OOM_AT_STEP: "3"}))
    assert p.returncode == 6, p.stderr[-3000:]
    doc = json.loads((old / "attempts.json").read_text())
    for a in doc["attempts"]:
        a["dir"] = str(old)
    (old / "attempts.json").write_text(json.dumps(doc))
    plan = json.loads((old / "plan.json").read_text())
    (old / "plan.json").write_text(json.dumps(dict(plan, output_dir=str(old))))
    new = tmp_path / "new"
    shutil.copytree(old, new)
    before = snapshot(old)
    p = vramplan("run", "--resume", "--output", str(new), "--skip-preflight")
    assert p.returncode == 0, p.stderr[-3000:]
    assert snapshot(old) == before and (new / "final" / "adapter_model.safetensors").exists()
    figures.tally("runs_recovered")
