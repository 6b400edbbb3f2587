"""Output dir writable (write + fsync + delete a probe file, inodes) and free space vs the plan's disk need.

The need comes from the plan's `estimate.disk_breakdown` (vramplan/estimate/host.py;
docs/estimate.md#cpu-ram-and-disk): the checkpoints on disk at once, exports, logs go to
the output dir's filesystem; base weights go to the Hugging Face cache unless already there or given as
local dirs; the dataset counts only when it is not on this machine yet. A 10% margin on top
(docs/preflight.md#disk-space).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from vramplan.preflight.base import CheckResult, Context, nearest_existing, plan_hint
from vramplan.preflight.hfcache import base_repo_ids, cached_model, trainer_hub_cache
from vramplan.units import fmt_bytes

MARGIN = 0.10  # headroom for logs, temp files and estimate error (docs/preflight.md#disk-space)
FILES_PER_CHECKPOINT = 40  # HF Trainer checkpoint-N: adapter, optimizer/ZeRO shards per rank, states, configs
MIN_FREE_INODES = 1000


@dataclass(frozen=True)
class DiskNeeds:
    output_bytes: int  # on the output dir's filesystem
    cache_bytes: int  # on the HF cache's filesystem (base-weight downloads)
    output_parts: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def disk_needs(ctx: Context) -> DiskNeeds | None:
    """Split the plan's disk need by filesystem; None without a plan disk estimate."""
    est = ctx.estimate
    breakdown = est.get("disk_breakdown")
    if not isinstance(breakdown, dict):
        if isinstance(est.get("disk_bytes"), (int, float)):
            return DiskNeeds(int(est["disk_bytes"]), 0, {"total": int(est["disk_bytes"])},
                             ("no disk breakdown in the plan: the whole need counted at the output dir",))
        return None
    notes: list[str] = []
    out_parts: dict = {}
    cache = 0
    for key, value in breakdown.items():
        if not isinstance(value, (int, float)) or value <= 0:
            continue
        value = int(value)
        if key == "base_weights":
            cache = _uncached_base_weights(ctx, value, notes)
        elif key == "dataset":
            ds = ctx.dataset or (ctx.section("data").get("dataset"))
            if ds and Path(ds).is_file():
                notes.append("dataset already on this machine: not counted")
            else:
                out_parts[key] = value
                notes.append(f"dataset ({fmt_bytes(value)}) not here yet: counted at the output dir")
        else:
            out_parts[key] = value
    return DiskNeeds(sum(out_parts.values()), cache, out_parts, tuple(notes))


def _uncached_base_weights(ctx: Context, value: int, notes: list[str]) -> int:
    m = ctx.section("model")
    local = [m.get(k) for k in ("path", "llm_path", "vision_path") if m.get(k)] or [str(p) for p in ctx.model_paths]
    if local and all(Path(p).exists() for p in local):
        notes.append("base weights are local dirs: no download counted")
        return 0
    ids = base_repo_ids(m.get("hf_ids"))
    if not ids:
        notes.append(f"base weights ({fmt_bytes(value)}) counted as a download to the Hugging Face cache")
        return value
    cache = trainer_hub_cache(ctx)
    have, cached_ids = 0, []
    for rid in ids:
        st = cached_model(rid, cache)
        if st.complete:
            have += st.weight_bytes
            cached_ids.append(rid)
    if cached_ids:
        notes.append(f"already in the Hugging Face cache ({cache}): {', '.join(cached_ids)} - not counted")
    need = max(0, value - have) if len(cached_ids) < len(ids) else 0
    if need:
        notes.append(f"base weights to download: {fmt_bytes(need)} into {cache}")
    return need


def _free(path: Path) -> tuple[Path, int, int, int]:
    """(measured dir, free bytes for us, total bytes, st_dev)."""
    where = nearest_existing(path)
    du = shutil.disk_usage(where)
    return where, du.free, du.total, os.stat(where).st_dev


def space_result(output_dir: Path, output_need: int, cache_dir: Path | None = None, cache_need: int = 0,
                 notes: tuple[str, ...] = (), margin: float = MARGIN) -> CheckResult:
    """Compare free space with the needs (bytes) at the output dir's and the cache's filesystems."""
    name = "disk-space"
    o_where, o_free, _o_total, o_dev = _free(output_dir)
    facts = {"output_dir": str(output_dir), "measured_at": str(o_where), "output_free_bytes": o_free,
             "output_need_bytes": output_need, "margin": margin}
    problems, warns = [], []
    if cache_dir is not None and cache_need > 0:
        c_where, c_free, _c_total, c_dev = _free(cache_dir)
        facts.update(cache_dir=str(cache_dir), cache_free_bytes=c_free, cache_need_bytes=cache_need,
                     shared_filesystem=c_dev == o_dev)
        if c_dev == o_dev:
            total = output_need + cache_need
            need_m = int(total * (1 + margin))
            found = (f"output dir and Hugging Face cache share one filesystem: {fmt_bytes(o_free)} free at {o_where}, "
                     f"need {fmt_bytes(total)} (checkpoints/exports {fmt_bytes(output_need)} + downloads "
                     f"{fmt_bytes(cache_need)}) + {margin:.0%} margin = {fmt_bytes(need_m)}")
            if o_free < need_m:
                problems.append(found)
            elif total > 0.5 * o_free:
                warns.append(found + "; the downloads and checkpoints take over half of it")
            else:
                facts["summary"] = found
        else:
            need_c = int(cache_need * (1 + margin))
            text = f"HF cache {c_where}: {fmt_bytes(c_free)} free, need {fmt_bytes(cache_need)} + margin"
            (problems if c_free < need_c else facts.setdefault("ok_parts", [])).append(text)
    if "shared_filesystem" not in facts or not facts["shared_filesystem"]:
        need_o = int(output_need * (1 + margin))
        text = (f"output {o_where}: {fmt_bytes(o_free)} free, need {fmt_bytes(output_need)} "
                f"+ {margin:.0%} margin = {fmt_bytes(need_o)}")
        (problems if o_free < need_o else facts.setdefault("ok_parts", [])).append(text)
    tail = (" (" + "; ".join(notes) + ")") if notes else ""
    facts["notes"] = list(notes)
    if problems:
        fix = (f"df -h {o_where}   # free space there, or choose another --output DIR on a larger disk\n"
               f"vramplan estimate --keep-checkpoints 1 ...   # fewer kept checkpoints need less")
        if cache_dir is not None and cache_need > 0:
            fix += "\nexport HF_HUB_CACHE=/path/on/a/larger/disk"
        return CheckResult(name, "FAIL", "not enough free disk: " + "; ".join(problems + warns) + tail, fix, facts)
    if warns:
        return CheckResult(name, "WARN", "; ".join(warns) + tail,
                           "export HF_HUB_CACHE=/path/on/another/disk   # or --output DIR on another disk", facts)
    parts = facts.get("ok_parts", []) + ([facts["summary"]] if "summary" in facts else [])
    return CheckResult(name, "PASS", "enough free disk: " + "; ".join(parts) + tail, "", facts)


def check_disk_space(ctx: Context) -> CheckResult:
    needs = disk_needs(ctx)
    if needs is None:
        where, free, _, _ = _free(ctx.output_dir)
        cache = trainer_hub_cache(ctx)
        c_where, c_free, _, _ = _free(cache)
        return CheckResult("disk-space", "SKIP", f"{fmt_bytes(free)} free at {where}, {fmt_bytes(c_free)} at the "
                                                 f"Hugging Face cache {c_where}; {ctx.need_note()}", plan_hint(),
                           {"output_free_bytes": free, "cache_free_bytes": c_free})
    cache = trainer_hub_cache(ctx) if needs.cache_bytes else None
    return space_result(ctx.output_dir, needs.output_bytes, cache, needs.cache_bytes, needs.notes)


def inode_need(ctx: Context) -> int:
    keep = ctx.section("recipe").get("keep_checkpoints")
    keep = int(keep) if isinstance(keep, (int, float)) else 2
    return MIN_FREE_INODES + FILES_PER_CHECKPOINT * (keep + 1)


def writable_result(output_dir: Path, inodes_needed: int = MIN_FREE_INODES) -> CheckResult:
    """Write, fsync and delete a probe file where the run will write; count free inodes there."""
    name = "output-dir"
    out = Path(os.path.abspath(output_dir))
    if out.exists() and not out.is_dir():
        return CheckResult(name, "FAIL", f"{out} exists and is not a directory", "choose another --output DIR")
    where = nearest_existing(out)
    if not where.is_dir():
        return CheckResult(name, "FAIL", f"{where} (the closest existing parent of {out}) is not a directory",
                           "choose another --output DIR")
    facts: dict = {"output_dir": str(out), "tested_in": str(where), "exists": out.exists()}
    probe = where / f".vramplan-preflight-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        return CheckResult(name, "FAIL", f"cannot write in {where}: {e.strerror or e} (errno {e.errno})",
                           f"ls -ld {where}   # fix its permissions/mount, or choose another --output DIR",
                           dict(facts, errno=e.errno))
    st = os.statvfs(where)
    facts.update(inodes_free=st.f_favail, inodes_total=st.f_files, inodes_needed=inodes_needed)
    where_txt = str(out) if out.exists() else f"{out} (does not exist yet; created in {where})"
    if st.f_files and st.f_favail < inodes_needed:
        return CheckResult(name, "FAIL", f"{where_txt} is writable but its filesystem has only {st.f_favail} free "
                                         f"inodes (files), the run needs about {inodes_needed}",
                           f"df -i {where}   # delete small files there, or choose another --output DIR", facts)
    inodes = f"{st.f_favail} free inodes" if st.f_files else "inode count not reported by this filesystem"
    return CheckResult(name, "PASS", f"{where_txt}: write + fsync + delete of a probe file worked; {inodes}", "",
                       facts)


def check_output_dir(ctx: Context) -> CheckResult:
    return writable_result(ctx.output_dir, inode_need(ctx))
