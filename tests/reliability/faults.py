"""Shared tools of the fault suite: the tiny model, trainer runs (in this process, or a forked process that
can be killed), a real small tmpfs and a file-size limit to fill "the disk", and the checks every fault ends
with (the trainer's own verification, nothing partial left, readable sizes)."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from train import checkpoint as ck

from . import figures

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))  # tests/train: the trainer test helpers
from test_train_end import _cfg as train_cfg  # noqa: F401 - re-exported for the fault tests
from trainhelpers import base_args, read_jsonl  # noqa: F401

TRIALS_ENV = "VRAMPLAN_RELIABILITY_TRIALS"  # more seeded kill trials on demand (docs/run.md "Reliability")


_TINY: dict[str, Path] = {}


def _tiny(factory) -> Path:
    from train.tiny import build

    if "dir" not in _TINY:  # one build however many test modules import the fixture
        _TINY["dir"] = build(factory.mktemp("tiny"), samples=8, distinct=2, parts=False)
    return _TINY["dir"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """tiny/model (HF LLaVA), tiny/data.json (8 records), tiny/images: built once per session."""
    return _tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def one_thread():
    """In-process trainer runs on one CPU thread (the tiny model gains nothing from more; CI has 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trials(default: int) -> int:
    return int(os.environ.get(TRIALS_ENV) or default)


# ---- the checks every fault ends with -------------------------------------------------------------------

def partial_files(run_dir: Path) -> list[str]:
    """Anything a writer leaves while it writes: .tmp-checkpoint-*, .tmp-final-*, .summary.json.tmp-*, ...;
    and a final/ that does not verify."""
    left = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp" in p.name or ".old-" in p.name]
    if (run_dir / "final").exists() and not ck.verify(run_dir / "final"):
        left.append("final/ (does not verify)")
    return left


SIZE = re.compile(r"(\d+(?:\.\d+)?) ?(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\b")


def assert_readable_sizes(message: str, sizes_expected: bool = False) -> None:
    """Sizes name a unit that shows them (3.00 KiB, not 0.00 GiB)."""
    found = SIZE.findall(message)
    assert not sizes_expected or found, message
    for number, unit in found:
        assert float(number) > 0 or unit == "B", f"unreadable size {number} {unit} in: {message}"
    assert not re.search(r"\b\d+(\.\d+)? ?G\b", message), message


def newest_verified_step(run_dir: Path) -> int | None:
    path, _skipped = ck.newest_verified(run_dir / "checkpoints")
    return int(path.name.split("-")[1]) if path else None


def saved_steps(run_dir: Path) -> list[int]:
    """Steps logged as saved (metrics.jsonl "checkpoint" events: written only after verification)."""
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [e["step"] for e in _events(run_dir) if e["event"] == "checkpoint"]


def _events(run_dir: Path) -> list[dict]:
    import json

    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill: counted by the caller as it wishes
            continue
    return out


def resume_starts(run_dir: Path) -> list[int]:
    """The step each invocation started training at (metrics.jsonl "start" events)."""
    return [e["step"] for e in _events(run_dir) if e["event"] == "start"]


def count_lost(run_dir: Path, saved_before: list[int], resumed_at: int | None, keep: int) -> int:
    """Checkpoints logged as saved before the fault that resume could not use: the newest saved one must be the
    one resume restarted from (or an even newer verified one)."""
    newest = max(saved_before[-keep:], default=None)
    lost = int(newest is not None and (resumed_at is None or resumed_at < newest))
    figures.tally("checkpoints_lost", lost)
    return lost


def recovered(run_dir: Path, max_steps: int) -> None:
    """After the resume: a verified final/ at max_steps, a summary saying ok, nothing partial left."""
    import json

    man = ck.verify(run_dir / "final")
    assert man and man["step"] == max_steps, man
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"
    assert partial_files(run_dir) == []
    figures.tally("runs_recovered")


# ---- "the disk is full": a real tmpfs, or a file-size limit --------------------------------------------

@contextlib.contextmanager
def small_tmpfs(where: Path, size_mib: int):
    """A real tmpfs of `size_mib` MiB mounted at `where` (needs root or CAP_SYS_ADMIN: skipped otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
                           capture_output=True, text=True, timeout=30)
        why = (p.stderr or p.stdout).strip()[:120] or "mount failed" if p.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:  # no mount(8) here
        why = str(e)[:120]
    if why:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the rlimit variant of this test covers the same point")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(mount: Path, leave: int) -> Path:
    """Fill the filesystem of `mount` with a ballast file until `leave` bytes are free (real ENOSPC after)."""
    ballast = mount / "ballast"
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    have = ballast.stat().st_size if ballast.exists() else 0
    grow = free - leave
    if grow > 0:
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, have, grow)
        finally:
            os.close(fd)
    return ballast


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process: a write past `nbytes` in any file fails with EFBIG (SIGXFSZ ignored).
    Works without root, on any filesystem."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


# ---- trainers in forked processes: fast to start (imports done once), killable with SIGKILL --------------

PRELOAD = ["train.__main__", "train.training", "train.engine", "train.model", "train.data", "train.export",
           "peft", "transformers.models.llava.modeling_llava", "safetensors.torch", "reliability.faults"]


@functools.cache
def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _trainer_child(argv: list[str], log: str, env: dict, die_at: str | None, die_n: int) -> None:
    """The child: `python -m train ARGV` after the imports, stderr to `log`; `die_at` makes it SIGKILL itself at
    a named point of the checkpoint protocol (see KILL_POINTS) the `die_n`-th time it is reached."""
    import torch

    os.environ.update(env)
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    if die_at:
        KILL_POINTS[die_at](die_n)
    from train.__main__ import main

    sys.exit(main(argv))


def _die_on(module, name: str, n: int, before: bool = True, during=None) -> None:
    real = getattr(module, name)
    seen = {"n": 0}

    def wrapper(*a, **k):
        seen["n"] += 1
        if seen["n"] == n:
            if during:
                during(*a, **k)
            if before:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
            return out
        return real(*a, **k)

    setattr(module, name, wrapper)


def _half_rmtree(path, *a, **k) -> None:
    """Delete half of the files of `path` (a prune cut in the middle)."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    for p in files[: len(files) // 2]:
        p.unlink()


def _half_written(staged, *a, **k) -> None:
    """Cut the largest staged file in half: the kill came in the middle of its write."""
    files = sorted((p for p in Path(staged).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if files:
        os.truncate(files[-1], files[-1].stat().st_size // 2)


def _die_in_prune(n: int) -> None:
    real_prune = ck.prune
    seen = {"n": 0}

    def prune(root, keep, current_step=None):
        seen["n"] += 1
        if seen["n"] == n:
            ck.shutil.rmtree = lambda p, *a, **k: (_half_rmtree(p), os.kill(os.getpid(), signal.SIGKILL))
        return real_prune(root, keep, current_step)

    ck.prune = prune


def _die_in_summary(n: int) -> None:
    import train.training as T

    real = T.write_json

    def write_json(path, obj):
        if Path(path).name == "summary.json" and obj.get("status") == "ok":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, obj)

    T.write_json = write_json


KILL_POINTS = {
    "tmp-write": lambda n: _die_on(ck, "seal", n, during=_half_written),  # a staged file half written
    "before-manifest": lambda n: _die_on(ck, "build_manifest", n),  # files written and fsynced, no MANIFEST
    "before-rename": lambda n: _die_on(ck, "seal", n, before=False),  # MANIFEST verified, not yet renamed
    "after-rename": lambda n: _die_on(ck, "finalize", n, before=False),  # renamed, before the prune
    "mid-prune": _die_in_prune,  # half of an old checkpoint deleted (n >= keep + 1: something to prune)
    "final-export": lambda n: _die_on(ck, "publish", 1),  # final/ staged in .tmp-final-<pid>, not published
    "summary": _die_in_summary,  # final/ published, summary.json not written
}


def start_trainer(argv: list[str], log: Path, env: dict | None = None, die_at: str | None = None,
                  die_n: int = 1):
    """A trainer in a forked process (a multiprocessing.Process: .pid, .kill(), .join(), .exitcode)."""
    proc = _context().Process(target=_trainer_child, args=(argv, str(log), dict(env or {}), die_at, die_n))
    proc.start()
    return proc


def finish(proc, timeout: float = 240) -> int:
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"trainer pid {proc.pid} did not end in {timeout} s")
    code = proc.exitcode if proc.exitcode >= 0 else 128 - proc.exitcode  # -9 -> 137, as a shell says it
    figures.exit_code(code)
    return code
