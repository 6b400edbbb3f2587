"""Concurrency (issue 11): two trainers into one run dir, two `vramplan run` into one dir started together
(with their preflight: the window in which both used to start), then two `--resume` of it together. Each
time exactly one runs; the other exits 2 naming the holder's pid, and the run dir stays one verified run.
(`--resume` while a trainer lives: tests/reliability/test_kill.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from test_run_e2e import ENV, tiny_plan

from train import checkpoint as ck

from . import faults, figures
from .faults import tiny

__all__ = ["tiny"]
pytestmark = pytest.mark.slow
STEPS = 12


def _one_ran(codes: dict, said: dict, winner_code: int = 0) -> int:
    """{pid: exit code}, {pid: output}: the winner's code, and 2 naming the winner; returns the winner's pid."""
    for code in codes.values():
        figures.exit_code(code)
    assert sorted(codes.values()) == sorted([winner_code, 2]), {pid: s[-2000:] for pid, s in said.items()}
    winner = next(pid for pid, c in codes.items() if c == winner_code)
    loser = next(pid for pid, c in codes.items() if c == 2)
    assert f"pid {winner}" in said[loser], said[loser][-2000:]
    return winner


def _single_verified_run(run_dir, steps: int, starts: int = 1) -> None:
    assert len(faults.resume_starts(run_dir)) == starts  # one trainer trained in it
    assert all(ck.verify(p) for _s, p in ck.list_checkpoints(run_dir / "checkpoints"))
    faults.recovered(run_dir, steps)


def test_two_trainers_into_one_dir(tiny, tmp_path):
    run = tmp_path / "run"
    argv = faults.base_args(tiny, run, "--max-steps", "2", "--save-steps", "1")
    procs = [faults.start_trainer(argv, tmp_path / f"t{i}.log") for i in range(2)]
    figures.tally("faults_injected")
    codes = {p.pid: faults.finish(p) for p in procs}
    said = {p.pid: (tmp_path / f"t{i}.log").read_text() for i, p in enumerate(procs)}
    _one_ran(codes, said)
    _single_verified_run(run, 2)


def _start(*argvs) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "vramplan", *a], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for a in argvs]


def _ended(procs) -> tuple[dict, dict]:
    outs = {p.pid: p.communicate(timeout=400) for p in procs}
    return {p.pid: p.returncode for p in procs}, {pid: o + e for pid, (o, e) in outs.items()}


def test_two_vramplan_runs_then_two_resumes_into_one_dir(tiny, tmp_path):
    """The winner of the two runs is stopped (SIGTERM) after its first checkpoint; the two resumes of its
    interrupted run then race, and the winner of those finishes it."""
    plan_path = tiny_plan(tiny, tmp_path)
    plan = json.loads(plan_path.read_text())
    plan["recipe"].update(max_steps=STEPS, save_steps=2)
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "run"
    run = ["run", "--plan", str(plan_path), "--output", str(out)]
    figures.tally("faults_injected")
    procs = _start(run, run)
    first_ckpt = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and faults.saved_steps(out)) and time.time() < first_ckpt:
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # stop at the next step boundary: an interrupted run to resume
    _one_ran(*_ended(procs), winner_code=130)
    assert len(faults.resume_starts(out)) == 1 and faults.newest_verified_step(out)

    resume = ["run", "--resume", "--output", str(out), "--skip-preflight"]
    figures.tally("faults_injected")
    _one_ran(*_ended(_start(resume, resume)))
    _single_verified_run(out, STEPS, starts=2)  # the first trainer, then one resumed trainer
    attempts = json.loads((out / "attempts.json").read_text())["attempts"]
    assert [a["kind"] for a in attempts] == ["interrupted", "ok"]
