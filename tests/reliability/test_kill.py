"""Seeded kill -9 trials (issue 11): of the trainer, at random times and at named points of the checkpoint
protocol (a staged file half written, before its MANIFEST, before and right after the rename, in the middle
of a prune, while final/ or summary.json is written); and of `vramplan run` itself, whose trainer lives on
and must not get a second owner. After each: --resume restarts from the newest verified checkpoint and ends
with a verified final/. VRAMPLAN_RELIABILITY_TRIALS=N runs N trainer trials (default 6) and N // 4
`vramplan` trials (default 1); trial i always draws the same fault."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from test_run_e2e import ENV, tiny_plan, vramplan

from vramplan.contract import TRAINER_LOCK, lock_holder

from . import faults, figures
from .faults import tiny

__all__ = ["tiny"]
pytestmark = pytest.mark.slow

MAX_STEPS, KEEP = 5, 2
VP_STEPS = 12
# the first trials take these points in turn; later ones draw from all of them (seeded)
ORDER = ["tmp-write", "after-rename", "mid-prune", "time", "before-rename", "final-export", "before-manifest",
         "summary"]


def _draw(trial: int) -> tuple[str, int, float]:
    rng = random.Random(1100 + trial)
    kind = ORDER[trial] if trial < len(ORDER) else rng.choice(ORDER)
    low = KEEP + 1 if kind == "mid-prune" else 1  # a prune that removes something
    return kind, rng.randint(low, MAX_STEPS), rng.uniform(0.3, 4.0)


@pytest.mark.parametrize("trial", range(faults.trials(6)))
def test_trainer_kill9_then_resume(trial, tiny, tmp_path):
    kind, nth, delay = _draw(trial)
    run = tmp_path / "run"
    argv = faults.base_args(tiny, run, "--max-steps", str(MAX_STEPS), "--save-steps", "1",
                            "--keep-checkpoints", str(KEEP))
    log = tmp_path / "train.log"
    proc = faults.start_trainer(argv, log, die_at=None if kind == "time" else kind, die_n=nth)
    if kind == "time":
        proc.join(delay)
        proc.kill()
    code = faults.finish(proc)
    figures.tally("faults_injected")
    assert code == 137 or (kind == "time" and code == 0), log.read_text()[-3000:]
    assert lock_holder(run / TRAINER_LOCK) is None  # the kernel released the dead trainer's lock
    saved = faults.saved_steps(run) if run.exists() else []
    newest = faults.newest_verified_step(run) if run.exists() else None
    starts_before = len(faults.resume_starts(run)) if (run / "metrics.jsonl").exists() else 0

    resume_log = tmp_path / "resume.log"
    code = faults.finish(faults.start_trainer([*argv, "--resume"], resume_log))
    text = resume_log.read_text()
    assert code == 0, f"{kind} #{nth}: {text[-3000:]}"
    starts = faults.resume_starts(run)
    if len(starts) > starts_before:  # it trained (a finished run resumes with nothing to train)
        assert starts[-1] == (newest or 0), f"{kind} #{nth}: resumed at {starts[-1]}, newest verified {newest}"
        if newest:
            assert f"continuing from checkpoint-{newest}" in text
    assert faults.count_lost(run, saved, newest, KEEP) == 0
    faults.recovered(run, MAX_STEPS)


def _wait_for(cond, timeout: float, what: str, proc=None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("trial", range(max(1, faults.trials(6) // 4)))
def test_vramplan_kill9_leaves_one_owner_then_takeover_resumes(trial, tiny, tmp_path):
    """kill -9 of `vramplan run` leaves its trainer running: --resume refuses (exit 2, naming the trainer's
    pid) while it lives; --resume --takeover stops it and continues from the newest verified checkpoint."""
    rng = random.Random(2200 + trial)
    plan_path = tiny_plan(tiny, tmp_path)
    plan = json.loads(plan_path.read_text())
    plan["recipe"].update(max_steps=VP_STEPS, save_steps=2, keep_checkpoints=KEEP)
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "run"
    vp = subprocess.Popen([sys.executable, "-m", "vramplan", "run", "--plan", str(plan_path), "--output", str(out),
                           "--skip-preflight", "--json"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        _wait_for(lambda: faults.saved_steps(out) if (out / "metrics.jsonl").exists() else False, 300,
                  "the trainer's first checkpoint", vp)
        time.sleep(rng.uniform(0.0, 1.5))
    finally:
        vp.kill()
        vp.communicate()
    figures.tally("faults_injected")
    figures.exit_code(128 + 9)
    orphan = lock_holder(out / TRAINER_LOCK)
    try:
        _refuse_then_takeover(out, orphan)
    finally:  # never leave a trainer behind, whatever failed
        if orphan and lock_holder(out / TRAINER_LOCK):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(orphan.get("pgid") or orphan["pid"], signal.SIGKILL)


def _refuse_then_takeover(out, orphan: dict | None) -> None:
    if orphan:  # still training: a plain --resume must not start a second trainer in the dir
        group = orphan.get("pgid") or orphan["pid"]
        os.killpg(group, signal.SIGSTOP)  # held alive (paused) so the refusal does not depend on timing
        try:
            p = vramplan("run", "--resume", "--output", str(out), "--skip-preflight", "--json")
        finally:
            os.killpg(group, signal.SIGCONT)
        figures.exit_code(p.returncode)
        said = p.stdout + p.stderr
        assert p.returncode == 2 and f"pid {orphan['pid']}" in said and "--takeover" in said, said[-2000:]
    p = vramplan("run", "--resume", "--takeover", "--output", str(out), "--skip-preflight", "--json")
    figures.exit_code(p.returncode)
    assert p.returncode == 0, p.stderr[-3000:]
    events = [e for e in faults.read_jsonl(out / "metrics.jsonl") if e["event"] in ("start", "checkpoint")]
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    if last_start > 0:  # the resumed trainer started at the newest checkpoint the orphan had saved
        before = [e["step"] for e in events[:last_start] if e["event"] == "checkpoint"]
        assert events[last_start]["step"] == max(before, default=0)
        assert faults.count_lost(out, before, events[last_start]["step"], KEEP) == 0
    assert lock_holder(out / TRAINER_LOCK) is None
    faults.recovered(out, VP_STEPS)
