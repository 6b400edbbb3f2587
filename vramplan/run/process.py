"""The trainer as a process: start it in its own process group, forward Ctrl-C, wait for the whole group.

The trainer runs in its own session (process group), so Ctrl-C reaches only vramplan. vramplan
forwards SIGINT to the trainer (torchrun and its workers), waits for it to stop cleanly (it keeps its
last verified checkpoint; docs/run.md) and lets the attempt loop report "interrupted" (exit 130).
A second Ctrl-C sends SIGTERM, a third SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vramplan.commands.output import message
from vramplan.run.launch import Launch
from vramplan.units import utc_stamp

# the signal sent on the 1st, 2nd, ... Ctrl-C; any further one sends SIGKILL
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Exited:
    """How one launch of the trainer ended."""

    returncode: int
    started: float  # time.time() at the start
    wall_seconds: float
    interrupted: bool  # vramplan forwarded at least one stop signal
    steps: int  # the last optimizer step the progress view saw


def psutil_errors() -> tuple:
    import psutil

    return (OSError, psutil.Error)


def _group_members(pgid: int) -> list:
    """Live (non-zombie) processes of process group `pgid` (the launcher may already be gone)."""
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                out.append(p)
        except psutil_errors():
            continue
    return out


def send_stop(pgid: int, launcher: str, sig: signal.Signals) -> None:
    """Ask the trainer to stop.

    torchrun starts its workers in their own sessions and forwards a signal once, and a single trainer
    is the group itself: signal the group. Under the deepspeed launcher the workers share the group and
    the launcher terminates them itself on SIGINT/SIGTERM (DeepSpeed launcher/launch.py, sigkill_handler),
    so a group signal would reach them twice (the trainer takes a second signal as "abort now"): signal
    only the launcher processes. SIGKILL hits everything.
    """
    if launcher == "deepspeed" and sig != signal.SIGKILL:
        for p in _group_members(pgid):
            try:
                if p.pid == pgid or "deepspeed.launcher" in " ".join(p.cmdline()):
                    p.send_signal(sig)
            except psutil_errors():
                pass
        return
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_group(pgid: int, timeout: float = 90.0) -> None:
    """Wait until no process of the trainer's process group is left (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_members(pgid):
        time.sleep(0.2)


def start_trainer(launch: Launch, env: dict[str, str], run_dir: Path, log: BinaryIO) -> subprocess.Popen:
    """Start node 0's command of `launch` in a new session, its output appended to `log`."""
    log.write(f"==> {utc_stamp()} {' '.join(launch.argv)}\n".encode())
    log.flush()
    # cwd = the run dir: a `train/` folder in the caller's cwd must not shadow the bundled trainer
    argv = [os.path.expandvars(a) if "${" in a else a for a in launch.argv]  # ${MASTER_ADDR} (multi-node)
    return subprocess.Popen(argv, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


@contextlib.contextmanager
def forwarding_stops(proc: subprocess.Popen, launcher: str) -> Iterator[list[signal.Signals]]:
    """While inside, Ctrl-C (and SIGTERM) to vramplan stop the trainer instead; yields the signals sent."""
    sent: list[signal.Signals] = []

    def forward(signum, frame):
        sig = STOP_SIGNALS[len(sent)] if len(sent) < len(STOP_SIGNALS) else signal.SIGKILL
        sent.append(sig)
        message(f"vramplan: stopping the trainer ({sig.name}); it keeps its last verified checkpoint"
                + ("" if len(sent) > 1 else " - press Ctrl-C again to force"))
        send_stop(proc.pid, launcher, sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield sent
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def launch_and_wait(launch: Launch, env: dict[str, str], run_dir: Path, view) -> Exited:
    """Start the trainer, poll `view` (a progress.ProgressView) until its whole group is gone, forward Ctrl-C."""
    started = time.time()
    with open(run_dir / "trainer.log", "ab") as log:
        proc = start_trainer(launch, env, run_dir, log)
        with forwarding_stops(proc, launch.launcher) as sent:
            try:
                while proc.poll() is None:
                    view.poll()
                    time.sleep(0.25)
                wait_group(proc.pid)  # e.g. deepspeed's launch.py and its workers outlive a runner interrupted early
            finally:
                state = view.close()
    return Exited(proc.returncode, started, round(time.time() - started, 2), bool(sent), state.step)
