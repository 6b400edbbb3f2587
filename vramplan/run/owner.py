"""One owner per run dir (docs/run.md "One owner per run dir"): `vramplan run` holds RUN/.vramplan.lock
for the whole run, each trainer's rank 0 holds .trainer.lock in its attempt dir (vramplan.contract
hold_run_lock: flock(2), released by the kernel when the holder dies). --resume refuses while a trainer
of the dir is alive (or stops it: --takeover) and marks attempts whose vramplan died as "abandoned".
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from vramplan import contract as C
from vramplan.commands.output import message
from vramplan.errors import UsageError
from vramplan.units import utc_stamp

TAKEOVER_WAIT_S = 120.0  # SIGTERM: the trainer stops at a step boundary; then SIGKILL


@contextlib.contextmanager
def owning(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.vramplan.lock while inside; taken before preflight and before anything else is written.
    A dir created here and left empty (e.g. preflight failed) is removed again."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--output {run_dir} exists and is not a directory", "choose a directory path")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = C.hold_run_lock(run_dir / C.VRAMPLAN_LOCK, "vramplan run")
    except C.ContractError as e:
        raise UsageError(e.message, "wait for it to end, or use another --output") from None
    except OSError as e:
        raise UsageError(f"--output {run_dir}: {e.strerror or e}", "choose a writable directory") from None
    try:
        yield
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when nothing was written


def trainer_dirs(root: Path, attempts: list[dict]) -> list[Path]:
    """The dirs a trainer of this run may hold its lock in: the run dir and its attempt dirs."""
    dirs = [root, *sorted(p for p in root.glob("attempt-*") if p.is_dir())]
    dirs += [Path(a["dir"]) for a in attempts if isinstance(a, dict) and isinstance(a.get("dir"), str)]
    return list(dict.fromkeys(dirs))


def live_trainers(dirs: list[Path]) -> list[tuple[Path, dict]]:
    return [(d, who) for d in dirs if (who := C.lock_holder(d / C.TRAINER_LOCK)) is not None]


def _stop(who: dict, sig: signal.Signals) -> None:
    target = who.get("pgid") or who.get("pid")
    if not isinstance(target, int) or target <= 1:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if who.get("pgid"):
            os.killpg(target, sig)
        else:
            os.kill(target, sig)


def _wait_free(dirs: list[Path], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while live_trainers(dirs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def check_trainers(root: Path, attempts: list[dict], takeover: bool, wait_s: float = TAKEOVER_WAIT_S) -> None:
    """--resume: no trainer of this run may be alive; with `takeover`, stop it (SIGTERM its process group,
    wait, then SIGKILL)."""
    dirs = trainer_dirs(root, attempts)
    live = live_trainers(dirs)
    if not live:
        return
    d, who = live[0]
    if not takeover:
        pid = who.get("pid", "?")
        raise UsageError(f"--resume: a trainer of {root} is still running in {d}: {C.owner_line(who)}",
                         f"wait for it to end, stop it (`kill -TERM -{who.get('pgid', pid)}`), or pass --takeover")
    for d, who in live:
        message(f"vramplan: --takeover: stopping the trainer in {d}: {C.owner_line(who)} (SIGTERM)")
        _stop(who, signal.SIGTERM)
    if not _wait_free(dirs, wait_s):
        for _, who in live_trainers(dirs):
            message(f"vramplan: --takeover: {C.owner_line(who)} did not stop in {wait_s:.0f} s; SIGKILL")
            _stop(who, signal.SIGKILL)
        if not _wait_free(dirs, 10.0):
            raise UsageError(f"--takeover: the trainer of {root} could not be stopped", "stop it by hand")


def repair_attempts(root: Path, attempts: list[dict]) -> list[dict]:
    """Attempts left "running" by a vramplan that died (its lock is free, no trainer alive) become
    "abandoned", with the steps their summary.json reached; attempts.json is rewritten when any changed."""
    changed = False
    out = []
    for a in attempts:
        if isinstance(a, dict) and a.get("kind") == "running":
            summary = _summary(Path(a["dir"]) if isinstance(a.get("dir"), str) else root)
            steps = summary.get("steps")
            a = dict(a, kind="abandoned", abandoned_utc=utc_stamp(), summary_status=summary.get("status"),
                     steps=steps if isinstance(steps, int) else None, wall_seconds=None, returncode=None)
            changed = True
        out.append(a)
    if changed:
        message(f"vramplan: {root / 'attempts.json'}: attempt(s) left running by a vramplan that died "
                "marked abandoned")
        with contextlib.suppress(OSError):
            from vramplan.run.relocate import write_attempts  # dirs stored relative to the run dir

            write_attempts(root, out)
    return out


def _summary(run_dir: Path) -> dict:
    from vramplan.run.attempts import read_json

    return read_json(run_dir / "summary.json") or {}



def repair_if_orphaned(root: Path, attempts) -> list:
    """repair_attempts() when no `vramplan run` and no trainer of `root` is alive (calibrate reads a run
    dir without owning it: a live run's "running" attempt is left as it is)."""
    if not isinstance(attempts, list) or not any(isinstance(a, dict) and a.get("kind") == "running"
                                                 for a in attempts):
        return attempts
    if C.lock_holder(root / C.VRAMPLAN_LOCK) is not None or live_trainers(trainer_dirs(root, attempts)):
        return attempts
    return repair_attempts(root, attempts)
