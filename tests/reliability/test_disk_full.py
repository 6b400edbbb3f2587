"""Disk full at every point of a run (issue 11): before a save, in the middle of a file, while pruning, while
final/ is exported, while summary.json is written. Each point runs twice: on a real small tmpfs filled by a
ballast file at that moment (real ENOSPC; skipped where mounting is not permitted), and portably, with a
file-size limit (RLIMIT_FSIZE: EFBIG) or the trainer's free-space test switch. Every point must end in exit 7,
the last verified checkpoint intact (the trainer's own verification), nothing partial left, sizes in a
readable unit; and the resume after space is freed finishes with a verified final/."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest

import train.export as export
import train.training as training
from train import checkpoint as ck
from vramplan.contract import ENV_TEST_FREE_BYTES

from . import figures
from .faults import (
    assert_readable_sizes,
    count_lost,
    file_size_limit,
    fill,
    newest_verified_step,
    one_thread,
    partial_files,
    recovered,
    resume_starts,
    saved_steps,
    small_tmpfs,
    tiny,
    train_cfg,
)

__all__ = ["one_thread", "tiny"]
pytestmark = pytest.mark.usefixtures("one_thread")
MAX_STEPS, KEEP = 4, 2
MIB = 2**20


def _on_call(monkeypatch, owner, name: str, n: int, act, after: bool = False) -> None:
    """Run `act()` at the n-th call of owner.name (before it, or after it returns)."""
    real = getattr(owner, name)
    seen = {"n": 0}

    def wrapper(*a, **k):
        seen["n"] += 1
        if seen["n"] == n and not after:
            act(*a)
        out = real(*a, **k)
        if seen["n"] == n and after:
            act(*a)
        return out

    monkeypatch.setattr(owner, name, wrapper)


def _inject(point: str, monkeypatch, disk, limits: contextlib.ExitStack, how: str) -> int:
    """Install the fault; returns the step of the checkpoint that must survive it."""
    if how == "tmpfs":
        full = {
            "before-save": lambda: _on_call(monkeypatch, ck, "ensure_space", 3, lambda *a: fill(disk, 256 * 2**10)),
            "mid-file": lambda: _on_call(monkeypatch, ck, "ensure_space", 3, lambda *a: fill(disk, 3 * MIB),
                                         after=True),
            "prune": lambda: _on_call(monkeypatch, ck, "prune", 3, lambda *a: fill(disk, 0), after=True),
            "final": lambda: _on_call(monkeypatch, export, "export_final", 1, lambda *a: fill(disk, MIB)),
            "summary": lambda: _wrap_summary(monkeypatch, lambda: fill(disk, 0)),
        }
    else:
        def fake_free(*a):
            monkeypatch.setenv(ENV_TEST_FREE_BYTES, "1000")

        def limit(n):
            return lambda *a: limits.enter_context(file_size_limit(n))

        full = {
            "before-save": lambda: _on_call(monkeypatch, ck, "ensure_space", 3, fake_free),
            "mid-file": lambda: _on_call(monkeypatch, ck, "ensure_space", 3, limit(6 * MIB), after=True),
            "prune": lambda: _on_call(monkeypatch, ck, "prune", 3, fake_free, after=True),
            "final": lambda: _on_call(monkeypatch, export, "export_final", 1, limit(MIB)),
            "summary": lambda: _wrap_summary(monkeypatch, limit(100)),
        }
    full[point]()
    return {"before-save": 2, "mid-file": 2, "prune": 3, "final": 4, "summary": 4}[point]


def _wrap_summary(monkeypatch, act) -> None:
    real = training.write_json

    def write_json(path, obj):
        if path.name == "summary.json" and obj.get("status") == "ok":
            act()
        return real(path, obj)

    monkeypatch.setattr(training, "write_json", write_json)


POINTS = ["before-save", "mid-file", "prune", "final", "summary"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
@pytest.mark.parametrize("point", POINTS)
def test_disk_full_at_every_point(point, how, tiny, tmp_path, monkeypatch, caplog):
    disk = tmp_path / "disk"
    with contextlib.ExitStack() as stack:
        if how == "tmpfs":
            stack.enter_context(small_tmpfs(disk, 64))
        limits = stack.enter_context(contextlib.ExitStack())
        run_dir = disk / "run"
        cfg = dict(max_steps=MAX_STEPS, save_steps=1, keep_checkpoints=KEEP)
        survivor = _inject(point, monkeypatch, disk, limits, how)
        figures.tally("faults_injected")
        with caplog.at_level(logging.INFO, logger="train"):
            code, _ = training.run(train_cfg(tiny, run_dir, **cfg))
        limits.close()  # the file-size limit ends with the run that hit it
        figures.exit_code(code)
        assert code == 7, caplog.text[-3000:]
        # the last verified checkpoint is intact, by the trainer's own deep (sha256) verification
        assert newest_verified_step(run_dir) == survivor
        assert ck.verify(run_dir / "checkpoints" / f"checkpoint-{survivor}", deep=True)
        assert partial_files(run_dir) == []
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors and any("disk" in m.lower() or "space" in m.lower() for m in errors), errors
        failure = run_dir / "failure.json"
        if failure.exists():  # with no byte left it cannot be written: the exit code and the log say it
            record = json.loads(failure.read_text())
            assert record["kind"] == "disk_full" and record["exit_code"] == 7
            errors.append(record["message"])
        for m in errors:
            assert_readable_sizes(m, sizes_expected=point == "before-save" and "needed" in m)
        saved = saved_steps(run_dir)
        # space is freed: the resume restarts from that checkpoint and finishes
        (disk / "ballast").unlink(missing_ok=True)
        monkeypatch.undo()
        code, _ = training.run(train_cfg(tiny, run_dir, resume=True, **cfg))
        figures.exit_code(code)
        assert code == 0
        assert resume_starts(run_dir)[-1] == survivor
        assert count_lost(run_dir, saved, survivor, KEEP) == 0
        recovered(run_dir, MAX_STEPS)


def test_efbig_enospc_edquot_are_all_disk_full():
    import errno
    import os

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        assert ck.is_disk_full(OSError(code, os.strerror(code)))
    assert ck.is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 27, kind: FileTooLarge })"))
    assert not ck.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_a_full_disk_leaves_no_torn_line_in_metrics(tmp_path):
    """metrics.jsonl is appended while the disk fills: the line that did not fit is taken back whole."""
    from train.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", True)
    log.write("step", step=1)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    figures.tally("faults_injected")
    with file_size_limit(len(before) + 10), pytest.raises(OSError) as e:
        log.write("checkpoint", step=1, path="x" * 200)
    assert ck.is_disk_full(e.value)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
