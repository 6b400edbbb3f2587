"""One owner per run dir (docs/run.md "One owner per run dir"): the flock of `vramplan run` and of the
trainer, --resume refusing a live trainer (or --takeover stopping it), attempts.json repaired."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from test_launch import make_plan

from vramplan import contract as C
from vramplan.cli import cli

HOLD = """
import sys, time
from vramplan.contract import hold_run_lock
lock = hold_run_lock(sys.argv[1], sys.argv[2])
print("held", flush=True)
time.sleep(300)
"""


def _holder(path, owner="vramplan run", **popen):
    """A process holding the lock file `path` until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), owner], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()), **popen)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.fixture
def holders():
    procs = []
    yield lambda *a, **k: procs.append(_holder(*a, **k)) or procs[-1]
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_holder_gets_the_first_ones_pid_and_the_kernel_frees_a_killed_holder(tmp_path, holders):
    path = tmp_path / C.VRAMPLAN_LOCK
    assert C.lock_holder(path) is None  # no file: free
    first = holders(path)
    who = C.lock_holder(path)
    assert who["pid"] == first.pid and who["owner"] == "vramplan run" and "hold_run_lock" not in who["command"]
    with pytest.raises(C.ContractError, match=rf"in use by vramplan run \(pid {first.pid}"):
        C.hold_run_lock(path, "vramplan run")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert C.lock_holder(path) is None  # released by the kernel; the stale file stays
    assert path.exists()
    with C.hold_run_lock(path, "me") as lock:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert json.loads(path.read_text())["owner"] == "me"  # the dead holder's record is gone
        with pytest.raises(C.ContractError):  # a second open file description in the same process: refused too
            C.hold_run_lock(path, "again")
        lock.update(trainer_pgid=7)
        assert C.lock_holder(path)["trainer_pgid"] == 7  # the probe sees it taken, with the added key
    assert not path.exists()  # released: removed while still held


def test_trainer_refuses_while_another_trainer_holds_the_dir(tmp_path, holders, caplog):
    from train import training

    other = holders(tmp_path / C.TRAINER_LOCK, "trainer")
    (tmp_path / "summary.json").write_text('{"status": "running"}')
    cfg = SimpleNamespace(ds_config=None, device="cpu", run_dir=tmp_path)
    with caplog.at_level(logging.ERROR, logger="train"):
        code, model = training.run(cfg)
    assert code == 2 and model is None
    assert f"pid {other.pid}" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [C.TRAINER_LOCK, "summary.json"]  # nothing touched


def _plan_file(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps(make_plan(tmp_path, device="cpu", model_path=str(tmp_path / "model"))))
    return p


def test_run_refuses_a_dir_another_vramplan_run_holds(tmp_path, holders):
    out = tmp_path / "run"
    out.mkdir()
    other = holders(out / C.VRAMPLAN_LOCK)
    res = CliRunner().invoke(cli, ["run", "--plan", str(_plan_file(tmp_path)), "--output", str(out),
                                   "--skip-preflight"])
    assert res.exit_code == 2, res.output
    assert f"pid {other.pid}" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in out.iterdir()) == [C.VRAMPLAN_LOCK]  # nothing written, nothing launched


def _killed_run(tmp_path, summary: dict | None = None):
    """A run dir whose vramplan was killed during attempt 1: attempts.json still says "running"."""
    out = tmp_path / "run"
    out.mkdir()
    plan = make_plan(tmp_path, device="cpu", model_path=str(tmp_path / "model"))
    (out / "plan.json").write_text(json.dumps(dict(plan, output_dir=str(out))))
    head = {"attempt": 1, "dir": str(out), "plan": {}, "why": "first plan", "resumed": False, "launch": {}}
    (out / "attempts.json").write_text(json.dumps({"schema": "vramplan-attempts/1",
                                                   "attempts": [dict(head, kind="running")]}))
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_resume_refuses_while_a_trainer_of_the_dir_is_alive(tmp_path, holders):
    out = _killed_run(tmp_path)
    before = (out / "attempts.json").read_text()
    orphan = holders(out / C.TRAINER_LOCK, "trainer")
    res = CliRunner().invoke(cli, ["run", "--resume", "--output", str(out), "--skip-preflight"])
    assert res.exit_code == 2, res.output
    assert f"pid {orphan.pid}" in res.output and "--takeover" in res.output
    assert (out / "attempts.json").read_text() == before and orphan.poll() is None


def test_takeover_stops_the_orphan_trainer(tmp_path, holders):
    from vramplan.run import owner

    out = _killed_run(tmp_path)
    orphan = holders(out / C.TRAINER_LOCK, "trainer", start_new_session=True)  # its own group, as launched
    owner.check_trainers(out, [], takeover=True, wait_s=20)
    assert orphan.wait(timeout=10) == -signal.SIGTERM
    assert C.lock_holder(out / C.TRAINER_LOCK) is None
    res = CliRunner().invoke(cli, ["run", "--takeover", "--plan", "x.json"])
    assert res.exit_code == 2 and "--takeover goes with --resume" in res.output


def test_resume_after_a_killed_vramplan_repairs_attempts_and_reports(tmp_path, monkeypatch):
    """Resume after a killed `vramplan`: attempt 1 was left "running" (no steps, no wall time); the
    report of the resumed run used to end in KeyError: 'steps' (exit 1)."""
    from vramplan.run import attempts as runner

    out = _killed_run(tmp_path, summary={"status": "interrupted", "steps": 4})
    seen = {}

    def fake_run_attempts(plan, settings, fallbacks, previous):
        seen["previous"] = previous
        rec = dict(previous[-1], attempt=2, kind="ok", steps=8, wall_seconds=1.5, returncode=0, why="resume")
        return {"exit_code": 0, "status": "ok", "attempts": previous + [rec], "final": rec}

    monkeypatch.setattr(runner, "run_attempts", fake_run_attempts)
    res = CliRunner().invoke(cli, ["run", "--resume", "--output", str(out), "--skip-preflight"])
    assert res.exit_code == 0, res.output
    assert "attempt 1: abandoned after 4 steps" in res.output and "attempt 2: ok after 8 steps" in res.output
    first = seen["previous"][0]
    assert first["kind"] == "abandoned" and first["abandoned_utc"] and first["steps"] == 4
    on_disk = json.loads((out / "attempts.json").read_text())["attempts"][0]
    assert on_disk["kind"] == "abandoned" and on_disk["summary_status"] == "interrupted"
    assert not (out / C.VRAMPLAN_LOCK).exists()  # released at the end


def test_render_report_takes_an_attempt_without_steps():
    from rich.console import Console

    from vramplan.commands.run_render import render_report

    con = Console(record=True, width=200)
    running = {"attempt": 1, "dir": "/r", "kind": "abandoned", "steps": None, "wall_seconds": None}
    render_report(con, {"vs_estimate": []}, {"attempts": [running, {"attempt": 2, "dir": "/r", "kind": "running",
                                                                      "why": "resume"}]})
    text = con.export_text()
    assert "attempt 1: abandoned after ? steps, ? s" in text and "attempt 2: running" in text


def test_two_runs_into_one_dir_only_one_starts(tmp_path):
    """Two `vramplan run` started together into one dir: the lock is taken before preflight, so the second
    stops (exit 2, naming the first's pid) however slow the first one's preflight is."""
    from vramplan.run import owner

    out = tmp_path / "run"
    with owner.owning(out):
        p = subprocess.run([sys.executable, "-m", "vramplan", "run", "--plan", str(_plan_file(tmp_path)),
                            "--output", str(out)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and f"pid {os.getpid()}" in p.stderr, p.stderr
        assert sorted(x.name for x in out.iterdir()) == [C.VRAMPLAN_LOCK]
    assert not out.exists()  # created by the lock and left empty: removed


def test_calibrate_repairs_an_attempt_whose_vramplan_died_but_not_a_live_one(tmp_path, holders):
    from vramplan.run.calibration import load_run

    out = _killed_run(tmp_path, summary={"status": "interrupted", "steps": 3})
    live = holders(out / C.VRAMPLAN_LOCK)  # its vramplan is alive: the record is current, leave it
    load_run(out)
    assert json.loads((out / "attempts.json").read_text())["attempts"][0]["kind"] == "running"
    live.kill()
    live.wait()
    load_run(out)
    first = json.loads((out / "attempts.json").read_text())["attempts"][0]
    assert first["kind"] == "abandoned" and first["steps"] == 3


def test_resume_refuses_while_another_vramplan_owns_the_dir(tmp_path, holders):
    """Two resumes started together: the second stops at the lock (it used to race on .plan.json.tmp)."""
    out = _killed_run(tmp_path)
    before = (out / "attempts.json").read_text()
    first = holders(out / C.VRAMPLAN_LOCK)
    res = CliRunner().invoke(cli, ["run", "--resume", "--output", str(out), "--skip-preflight", "--json"])
    assert res.exit_code == 2 and f"pid {first.pid}" in res.output, res.output
    assert (out / "attempts.json").read_text() == before
