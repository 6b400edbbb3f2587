"""Checkpoints that cannot be silently lost.

Protocol (one save; docs/contracts.md "Run directory"):
1. free-space check against the expected size (plan estimate.checkpoint_bytes, else the last verified
   checkpoint's size); if short, remove stale partial dirs and verified checkpoints that the keep-N rule
   would remove after this save anyway, never the newest one; still short -> DiskFullError (exit 7);
2. every rank writes into `checkpoints/.tmp-checkpoint-<step>-<tag>/checkpoint-<step>/`;
3. rank 0 fsyncs every file and dir, hashes every file into MANIFEST.json, re-reads and verifies them,
   then renames the dir to `checkpoints/checkpoint-<step>` (atomic on one filesystem) and fsyncs the parent;
4. only then deletes verified checkpoints beyond keep-N, and only then is "saved" logged.
Resume takes the newest checkpoint whose MANIFEST verifies (sizes and sha256); others are skipped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from train.exit_codes import DiskFullError
from vramplan.contract import ENV_TEST_FREE_BYTES, fmt_bytes

log = logging.getLogger("train")
MANIFEST = "MANIFEST.json"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
MARGIN = 1.10  # require 10% more than the expected size: sizes vary a little between saves


# how torch.save (inline_container.cc) and safetensors (Rust io::Error) word a full disk / a file-size limit
DISK_FULL_WORDS = ("no space left", "file write failed", "disk quota", "file too large", "filetoolarge", "storagefull")


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT/EFBIG anywhere in the exception chain (EFBIG: a file-size limit, RLIMIT_FSIZE or the
    filesystem's own, stops the write like a full disk). torch.save reports a full disk as
    `RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos` with the OSError chained."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        s = str(e).lower()
        if any(k in s for k in DISK_FULL_WORDS):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def hit_file_size_limit(root: Path) -> bool:
    """A file under `root` reached this process's RLIMIT_FSIZE: the write failed with EFBIG, which torch.save
    reports only as "iostream error". Like a full disk, the fix is room (or a higher limit), not a retry."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft == resource.RLIM_INFINITY:
        return False
    return any(p.is_file() and p.stat().st_size >= soft for p in Path(root).rglob("*"))


def free_bytes(path: Path) -> int:
    fake = os.environ.get(ENV_TEST_FREE_BYTES)  # test-only: pretend this many bytes are free
    if fake:
        return int(fake)
    return shutil.disk_usage(path).free


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def build_manifest(ckpt: Path, step: int) -> dict:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(ckpt).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return {"step": step, "files": files, "total_bytes": sum(f["bytes"] for f in files.values()), "complete": True}


def verify(ckpt: Path, deep: bool = True) -> dict | None:
    """The manifest when every listed file is there with its size (and sha256 when deep); else None."""
    try:
        man = json.loads((ckpt / MANIFEST).read_text())
        if not isinstance(man, dict) or man.get("complete") is not True or not isinstance(man.get("files"), dict):
            return None
        if not man["files"] or not all(isinstance(m, dict) for m in man["files"].values()):
            return None
        for rel, meta in man["files"].items():
            p = ckpt / rel
            if not p.is_file() or p.stat().st_size != meta["bytes"]:
                return None
            if deep and sha256_file(p) != meta["sha256"]:
                return None
        return man
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(out)


def newest_verified(root: Path) -> tuple[Path | None, list[str]]:
    """(newest checkpoint that verifies, names of the newer ones skipped as partial/corrupt)."""
    skipped = []
    for _step, p in reversed(list_checkpoints(root)):
        if verify(p, deep=True):
            return p, skipped
        skipped.append(p.name)
    return None, skipped


def last_size(root: Path) -> int | None:
    for _step, p in reversed(list_checkpoints(root)):
        man = verify(p, deep=False)
        if man:
            return int(man["total_bytes"])
    return None


def ensure_space(root: Path, expected: int | None, keep: int) -> None:
    """Make sure `expected` x MARGIN bytes are free, removing only what is safe to remove; else DiskFullError."""
    if not expected:
        return
    need = int(expected * MARGIN)
    if free_bytes(root) >= need:
        return
    for p in root.glob(TMP_PREFIX + "*"):  # partial writes of a crashed save: never trusted anyway
        shutil.rmtree(p, ignore_errors=True)
    verified = [p for _s, p in list_checkpoints(root) if verify(p, deep=False)]
    # after a successful save only keep-1 of these stay; the oldest of the others can go now, never the newest
    removable = verified[: max(0, len(verified) - max(keep - 1, 1))]
    while free_bytes(root) < need and removable:
        victim = removable.pop(0)
        log.warning("low disk space: removing %s early (keep-N would remove it after this save)", victim.name)
        shutil.rmtree(victim)
    free = free_bytes(root)
    if free < need:
        last = verified[-1].name if verified else "none"
        raise DiskFullError(
            f"not enough disk space for checkpoint: {fmt_bytes(free)} free at {root}, "
            f"{fmt_bytes(need)} needed (expected {fmt_bytes(expected)} + 10%); "
            f"last verified checkpoint: {last}",
            "free space on that disk (or point --output elsewhere), then rerun with --resume",
        )


def tmp_dir(root: Path, step: int, tag: str) -> Path:
    return root / f"{TMP_PREFIX}{step}-{tag}"


def seal(staged: Path, step: int) -> dict:
    """fsync every file and dir, write MANIFEST.json (sizes + sha256), re-read and verify. OSError if not durable."""
    fsync_tree(staged)
    man = build_manifest(staged, step)
    with open(staged / MANIFEST, "w") as f:
        json.dump(man, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(staged)
    if verify(staged, deep=True) is None:
        raise OSError(f"{staged} did not verify after writing")
    return man


def finalize(staged: Path, root: Path, step: int) -> tuple[Path, dict]:
    """seal + atomic rename to root/checkpoint-<step>. Raises DiskFullError when the data cannot be made durable."""
    try:
        man = seal(staged, step)
        dest = root / f"checkpoint-{step}"
        if dest.exists():  # a leftover at the same step (never verified newer than this one)
            shutil.rmtree(dest)
        os.rename(staged, dest)
        _fsync_dir(root)
        shutil.rmtree(staged.parent, ignore_errors=True)  # the now-empty .tmp-checkpoint-* wrapper
        return dest, man
    except OSError as e:
        shutil.rmtree(staged.parent, ignore_errors=True)
        raise DiskFullError(f"checkpoint {step} could not be written safely: {e}",
                            "free disk space, then rerun with --resume (the last verified checkpoint is intact)") from e


def publish(staged: Path, dest: Path, step: int) -> dict:
    """seal a finished dir (final/) and rename it into place; the old one is replaced only after verification."""
    try:
        man = seal(staged, step)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
            os.rename(staged, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staged, dest)
        _fsync_dir(dest.parent)
        return man
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise DiskFullError(f"{dest.name}/ could not be written safely: {e}",
                            "free disk space, then rerun with --resume (the last verified checkpoint is intact)") from e


FINAL_TMP_PREFIX = ".tmp-final-"  # run_dir/.tmp-final-<pid>/: final/ being written by that process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_final_tmp(run_dir: Path) -> list[str]:
    """Remove run_dir/.tmp-final-<pid>/ left by a writer that is gone (killed, or a failed export): never trusted."""
    removed = []
    for p in run_dir.glob(FINAL_TMP_PREFIX + "*"):
        pid = p.name[len(FINAL_TMP_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def prune(root: Path, keep: int, current_step: int | None = None) -> list[str]:
    """Delete verified checkpoints beyond the newest `keep`, unverified leftovers (never trusted), and any
    checkpoint numbered after `current_step` (the one just saved): --resume skipped it as partial or corrupt,
    so it is not part of this run's history and must not count as "newest"."""
    removed = []
    verified = []
    for s, p in list_checkpoints(root):
        if current_step is not None and s > current_step:
            log.warning("removing %s: newer than the checkpoint just saved (skipped on resume)", p.name)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        elif verify(p, deep=False):
            verified.append(p)
        else:
            log.warning("removing %s: it does not verify against its MANIFEST (partial or corrupt)", p.name)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    for p in verified[: max(0, len(verified) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    for p in root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)
    return removed
