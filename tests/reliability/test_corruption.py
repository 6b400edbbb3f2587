"""Corrupt checkpoints (issue 11): every kind of damage that train/checkpoint.py's verification covers (the
MANIFEST: missing, cut, not JSON, incomplete, empty, wrong types; the files it lists: missing, truncated,
zeroed, one bit flipped, grown, replaced by a directory) is detected and skipped, and --resume falls back
to the previous verified checkpoint and finishes."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

import train.training as training
from train import checkpoint as ck

from . import faults, figures
from .faults import one_thread, tiny

__all__ = ["one_thread", "tiny"]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # every test here trains
MAX_STEPS, KEEP = 3, 3
BIG = "optimizer.pt"


def _manifest(c: Path) -> Path:
    return c / ck.MANIFEST


def _edit_manifest(c: Path, edit) -> None:
    man = json.loads(_manifest(c).read_text())
    edit(man)
    _manifest(c).write_text(json.dumps(man))


def _flip_bit(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _append(p: Path) -> None:
    with open(p, "a") as f:
        f.write(" ")


def _to_dir(p: Path) -> None:
    p.unlink()
    p.mkdir()


CORRUPTIONS = {
    "manifest deleted": lambda c: _manifest(c).unlink(),
    "manifest truncated": lambda c: os.truncate(_manifest(c), _manifest(c).stat().st_size // 2),
    "manifest zeroed": lambda c: _manifest(c).write_bytes(b"\0" * _manifest(c).stat().st_size),
    "manifest empty": lambda c: _manifest(c).write_text(""),
    "manifest not an object": lambda c: _manifest(c).write_text("[1, 2]"),
    "manifest incomplete": lambda c: _edit_manifest(c, lambda m: m.update(complete=False)),
    "manifest lists no file": lambda c: _edit_manifest(c, lambda m: m.update(files={})),
    "manifest files a list": lambda c: _edit_manifest(c, lambda m: m.update(files=list(m["files"]))),
    "manifest size a string": lambda c: _edit_manifest(c, lambda m: m["files"][BIG].update(bytes="many")),
    "manifest entry without sha256": lambda c: _edit_manifest(c, lambda m: m["files"][BIG].pop("sha256")),
    "manifest is a directory": lambda c: _to_dir(_manifest(c)),
    "file deleted": lambda c: (c / BIG).unlink(),
    "file truncated": lambda c: os.truncate(c / BIG, (c / BIG).stat().st_size // 2),
    "file emptied": lambda c: os.truncate(c / "adapter_model.safetensors", 0),
    "file zeroed (same size)": lambda c: (c / BIG).write_bytes(b"\0" * (c / BIG).stat().st_size),
    "one bit flipped": lambda c: _flip_bit(c / "adapter_model.safetensors"),
    "file grown": lambda c: _append(c / "trainer_state.json"),
    "file replaced by a directory": lambda c: _to_dir(c / "scheduler.pt"),
    "every file deleted": lambda c: [p.unlink() for p in c.iterdir() if p.is_file()],
}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished run with checkpoint-1..3 (keep 3); its final/ and summary.json removed, so that --resume of
    a copy has the last step to train again."""
    run = tmp_path_factory.mktemp("corrupt") / "run"
    code, _ = training.run(faults.train_cfg(tiny, run, max_steps=MAX_STEPS, save_steps=1, keep_checkpoints=KEEP))
    assert code == 0
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def test_every_corruption_is_detected_and_skipped(finished, tmp_path):
    for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
        run = _copy(finished, tmp_path / str(i))
        newest = run / "checkpoints" / f"checkpoint-{MAX_STEPS}"
        corrupt(newest)
        figures.tally("faults_injected")
        assert ck.verify(newest, deep=True) is None, name
        path, skipped = ck.newest_verified(run / "checkpoints")
        assert path is not None and path.name == f"checkpoint-{MAX_STEPS - 1}", name
        assert skipped == [newest.name], name
        # the prune of the next save removes it (never trusted), the checkpoints that verify stay
        removed = ck.prune(run / "checkpoints", keep=KEEP, current_step=MAX_STEPS - 1)
        assert removed == [newest.name] and not newest.exists(), name
        assert [p.name for _s, p in ck.list_checkpoints(run / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("damaged, name", [
    (1, "file truncated"), (1, "file zeroed (same size)"), (1, "manifest deleted"), (1, "manifest not an object"),
    (2, "one bit flipped"), (3, "file deleted"),
])
def test_resume_falls_back_past_corrupt_checkpoints(damaged, name, finished, tiny, tmp_path, caplog):
    """The newest `damaged` checkpoints are corrupt: resume restarts from the newest one that verifies (step 0
    when none does), warns about each one skipped, and finishes with a verified final/."""
    run = _copy(finished, tmp_path)
    for step in range(MAX_STEPS, MAX_STEPS - damaged, -1):
        CORRUPTIONS[name](run / "checkpoints" / f"checkpoint-{step}")
        figures.tally("faults_injected")
    fallback = MAX_STEPS - damaged
    with caplog.at_level(logging.INFO, logger="train"):
        code, _ = training.run(faults.train_cfg(tiny, run, max_steps=MAX_STEPS, save_steps=1,
                                                keep_checkpoints=KEEP, resume=True))
    figures.exit_code(code)
    assert code == 0, caplog.text[-3000:]
    for step in range(MAX_STEPS, fallback, -1):
        assert f"skipping checkpoint-{step}" in caplog.text
    assert faults.resume_starts(run)[-1] == fallback
    assert [p.name for _s, p in ck.list_checkpoints(run / "checkpoints")] == [
        f"checkpoint-{s}" for s in range(1, MAX_STEPS + 1)]
    assert all(ck.verify(p) for _s, p in ck.list_checkpoints(run / "checkpoints"))
    faults.recovered(run, MAX_STEPS)

