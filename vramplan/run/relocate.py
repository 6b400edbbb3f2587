"""Relocatable run dirs (docs/run.md "Copying or moving a run dir").

Every path vramplan writes into a run dir (attempts.json, report.json, plan.json's paths inside the run
dir, launch.sh) is stored relative: an attempt's dir as "." or "attempt-N" (relative to the run dir), a
plan's paths as "./..." or "../..." (relative to that plan.json's dir; vramplan.contract.read_plan and
`plan_here` read them back). After `cp -r` or `mv`, the files are read relative to where the dir is now.

Run dirs written before this (absolute paths) still load: a path under the dir's old location (the first
attempt's "dir", else plan.json's "output_dir") is mapped to the same place under the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vramplan.contract import PLAN_PATH_KEYS, plan_paths_here, write_json

ATTEMPTS_SCHEMA = "vramplan-attempts/1"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _dotted(p: str) -> bool:
    return p == "." or p == ".." or p.startswith(("./", "../"))


def stored(path: str | os.PathLike, base: Path, root: Path | None = None) -> str:
    """`path` as stored in a file of dir `base`: "./x" or "../x" when it lies inside `root` (default `base`),
    else unchanged (e.g. a dataset outside the run dir)."""
    p = Path(os.path.abspath(path))
    if not _inside(p, Path(os.path.abspath(root or base))):
        return str(path)
    rel = os.path.relpath(p, os.path.abspath(base))
    return "." if rel == "." else (rel if rel.startswith("..") else f"./{rel}")


def moved(path: str, old_root: Path | None, root: Path) -> str:
    """An absolute `path` written when the run dir was at `old_root`, mapped to its place under `root`."""
    if old_root is None or not os.path.isabs(path):
        return path
    p, old = Path(os.path.normpath(path)), Path(os.path.normpath(old_root))
    if old == root or not _inside(p, old):
        return path
    return str(root / p.relative_to(old))


def here(path: str, base: Path, root: Path, old_root: Path | None) -> str:
    """A path read from a file of dir `base` in the run dir `root`: relative ones against `base`,
    absolute ones under the old location moved to `root`."""
    if not os.path.isabs(path):
        return os.path.normpath(base / path)
    return moved(path, old_root, root)


def _walk(plan: dict, fn) -> dict:
    out = dict(plan)
    for section, key in PLAN_PATH_KEYS:
        holder = out if section is None else out.get(section)
        if isinstance(holder, dict) and isinstance(holder.get(key), str) and holder[key]:
            if section is not None:
                holder = out[section] = dict(holder)
            holder[key] = fn(holder[key])
    return out


def plan_stored(plan: dict, plan_dir: Path, root: Path) -> dict:
    """The plan as written to `plan_dir`/plan.json: its paths inside the run dir `root` made relative."""

    def one(p: str) -> str:
        if not (os.path.isabs(p) or _dotted(p)):
            return p  # a profile id, a hub id, or a path relative to the caller's cwd (as given)
        full = os.path.abspath(p)
        return stored(full, plan_dir, root) if _inside(Path(full), Path(os.path.abspath(root))) else full

    return _walk(plan, one)


def plan_here(plan: dict, plan_dir: Path, root: Path, old_root: Path | None) -> dict:
    """A run dir's plan.json read where the dir is now: relative paths against `plan_dir`, absolute ones
    under the old location moved (a plan written before run dirs were relocatable)."""
    plan = plan_paths_here(plan, plan_dir)
    return _walk(plan, lambda p: moved(p, old_root, root))


def old_location(root: Path, attempts: list | None = None) -> Path | None:
    """Where an old run dir with absolute paths was written: its first attempt's dir (attempt 1 runs in the
    run dir itself), else its plan.json's output_dir. None when its files store relative paths."""
    first = attempts[0].get("dir") if attempts and isinstance(attempts[0], dict) else None
    if isinstance(first, str) and os.path.isabs(first):
        return Path(first)
    if first is None:
        try:
            out = json.loads((root / "plan.json").read_text()).get("output_dir")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(out, str) and os.path.isabs(out):
            return Path(out)
    return None


def attempts_here(root: Path, attempts: list) -> list:
    """attempts.json's records with "dir" an absolute path where the run dir is now."""
    old = old_location(root, attempts)
    out = []
    for a in attempts:
        if isinstance(a, dict) and isinstance(a.get("dir"), str):
            a = dict(a, dir=here(a["dir"], root, root, old))
        out.append(a)
    return out


def attempts_stored(root: Path, attempts: list) -> list:
    return [dict(a, dir=stored(a["dir"], root)) if isinstance(a, dict) and isinstance(a.get("dir"), str) else a
            for a in attempts]


def write_attempts(root: Path, attempts: list) -> None:
    """attempts.json with every attempt's dir relative to the run dir."""
    write_json(root / "attempts.json", {"schema": ATTEMPTS_SCHEMA, "attempts": attempts_stored(root, attempts)})


def read_plan_file(path: Path, root: Path, old_root: Path | None) -> dict | None:
    """A run dir's plan.json where the dir is now; None when missing or unreadable."""
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return None
    return plan_here(plan, path.parent, root, old_root) if isinstance(plan, dict) else None
