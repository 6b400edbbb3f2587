"""`vramplan calibrate`: per-component error from run dirs, calibration files, load_calibration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.errors import UsageError
from vramplan.run.calibration import (
    compare_run,
    load_calibration,
    load_run,
    write_calibration,
)
from vramplan.run.calibration_math import compare, factors

GiB = 2**30


def make_run(d: Path, *, device="cuda", alloc=(9 * GiB, 8 * GiB), reserved=(11 * GiB, 10 * GiB), steps=10,
             train_seconds=50.0, status="ok") -> Path:
    d.mkdir(parents=True)
    est = {"vram_per_gpu_bytes": 10 * GiB, "vram_allocated_per_gpu_bytes": 9 * GiB, "cpu_ram_bytes": 8 * GiB,
           "checkpoint_bytes": 100 * 2**20, "disk_bytes": 50 * GiB, "time_seconds": 1000.0, "steps": 100,
           "disk_breakdown": {"base_weights": 40 * GiB, "checkpoints": 3 * 100 * 2**20, "final_export": 2**20}}
    plan = {"schema": "vramplan-plan/1", "hardware": {"device": device, "total_gpus": 2}, "estimate": est,
            "batch": {"global_batch": 16}, "data": {"samples": 1600}, "recipe": {"epochs": 1}}
    (d / "plan.json").write_text(json.dumps(plan))
    summary = {"status": status, "steps": steps, "train_seconds": train_seconds, "wall_seconds": train_seconds + 5,
               "peak_allocated_bytes": list(alloc), "peak_reserved_bytes": list(reserved),
               "peak_rss_bytes": [3 * GiB, 3 * GiB], "checkpoint_bytes": 120 * 2**20, "device": device,
               "world_size": 2, "estimate": est}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "final").mkdir()
    (d / "final" / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    return d


def test_compare_rows(tmp_path):
    d = make_run(tmp_path / "r")
    rows = {r["component"]: r for r in compare_run(json.loads((d / "summary.json").read_text()),
                                                    json.loads((d / "plan.json").read_text()), d)}
    assert rows["vram_allocated"]["measured"] == 9 * GiB and rows["vram_allocated"]["ratio"] == pytest.approx(1.0)
    assert rows["vram_reserved"]["ratio"] == pytest.approx(1.1)
    assert rows["cpu_ram"]["measured"] == 6 * GiB and rows["cpu_ram"]["ratio"] == pytest.approx(0.75)
    assert rows["checkpoint"]["ratio"] == pytest.approx(1.2)
    assert rows["disk"]["measured"] == 4096 and rows["disk"]["estimated"] == 3 * 100 * 2**20 + 2**20
    # 50 s / 10 steps measured vs 1000 s / 100 steps estimated
    assert rows["time_per_step"]["ratio"] == pytest.approx(0.5)


def test_compare_is_pure_on_the_two_dicts(tmp_path):
    d = make_run(tmp_path / "r")
    summary, plan = json.loads((d / "summary.json").read_text()), json.loads((d / "plan.json").read_text())
    rows = {r["component"]: r for r in compare(summary, plan)}
    assert "disk" not in rows  # outputs on disk are measured from the run dir (compare_run)
    # a resumed process: train_seconds covers the 10 - 5 steps after the resume
    rows = {r["component"]: r for r in compare(summary, plan, outputs_bytes=4096, resumed_at=5)}
    assert rows["disk"]["measured"] == 4096 and rows["time_per_step"]["ratio"] == pytest.approx(1.0)


def test_cpu_run_compares_process_memory(tmp_path):
    d = make_run(tmp_path / "cpu", device="cpu")
    rows = {r["component"]: r for r in load_run(d)[0]["rows"]}
    assert "vram_allocated" not in rows
    # with the CPU as the device, the estimate's per-"GPU" figure is the per-process peak
    assert rows["cpu_process_memory"]["estimated"] == 10 * GiB


def test_factors_take_max_for_memory_median_for_time(tmp_path):
    runs = load_run(make_run(tmp_path / "a")) + load_run(make_run(tmp_path / "b", reserved=(13 * GiB,),
                                                                    train_seconds=100.0))
    runs += load_run(make_run(tmp_path / "c", train_seconds=300.0))
    fac = factors(runs)
    assert fac["vram_reserved"] == pytest.approx(1.3)
    assert fac["time_per_step"] == pytest.approx(1.0)  # median of 0.5, 1.0, 3.0


def test_calibration_roundtrip_toml_and_json(tmp_path):
    fac = {"vram_reserved": 1.25, "time_per_step": 0.8}
    for name in ("cal.toml", "cal.json"):
        p = write_calibration(tmp_path / name, fac, ["/x"])
        assert load_calibration(p) == fac


def test_bad_calibration_files(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"schema": "vramplan-calibration/1", "factors": {"vram_reserve": 1.1}}))
    with pytest.raises(UsageError, match="did you mean 'vram_reserved'"):
        load_calibration(p)
    p.write_text(json.dumps({"schema": "vramplan-calibration/1", "factors": {"time_per_step": -1}}))
    with pytest.raises(UsageError, match="must be a number"):
        load_calibration(p)
    p.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_calibration(p)
    with pytest.raises(UsageError):
        load_calibration(tmp_path / "missing.toml")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vramplan", "calibrate", *args], capture_output=True, text=True,
                          timeout=60)


def test_calibrate_cli_writes_file_and_skips_failed_runs(tmp_path):
    ok = make_run(tmp_path / "ok")
    oom = tmp_path / "oom"
    oom.mkdir()
    (oom / "failure.json").write_text(json.dumps({"kind": "oom", "phase": "train", "step": 1, "exit_code": 6}))
    out = tmp_path / "cal.toml"
    p = _cli(str(ok), str(oom), "--write", str(out), "--json")
    assert p.returncode == 0, p.stderr
    env = json.loads(p.stdout)
    assert env["status"] == "ok" and env["data"]["factors"]["checkpoint"] == pytest.approx(1.2)
    assert any("oom" in w for w in env["warnings"])
    assert any("disk" in w and "not used" in w for w in env["warnings"]) and "disk" not in env["data"]["factors"]
    assert load_calibration(out)["vram_reserved"] == pytest.approx(1.1)
    p = _cli(str(ok))
    assert p.returncode == 0 and "measured vs estimated" in p.stdout and "+10.0%" in p.stdout


def test_calibrate_cli_errors(tmp_path):
    p = _cli(str(tmp_path / "nope"))
    assert p.returncode == 2 and "not a directory" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "empty").mkdir()
    p = _cli(str(tmp_path / "empty"), "--json")
    assert p.returncode == 2 and json.loads(p.stdout)["errors"][0]["message"].endswith("found")
