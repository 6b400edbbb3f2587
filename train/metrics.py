"""metrics.jsonl (docs/contracts.md "Run directory"), memory per rank, and the collectives the run records need.

summary.json / failure.json are written atomically with `vramplan.contract.write_json`.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.t0 = time.time()

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "elapsed_s": round(time.time() - self.t0, 3), **fields}
        data = memoryview((json.dumps(rec, default=str) + "\n").encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
            except OSError:  # a full disk: no torn line left, every reader parses each line
                os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def local_memory(device: str) -> dict:
    """This rank: peak allocated / reserved on the accelerator (CPU: peak RSS, the process holds it all)."""
    import torch

    peak_rss = max(peak_rss_bytes(), rss_bytes())
    if device == "cuda":
        alloc, res = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        cur_a, cur_r = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    elif device == "npu":
        alloc, res = torch.npu.max_memory_allocated(), torch.npu.max_memory_reserved()
        cur_a, cur_r = torch.npu.memory_allocated(), torch.npu.memory_reserved()
    else:
        alloc = res = peak_rss
        cur_a = cur_r = rss_bytes()
    return {"peak_allocated": int(alloc), "peak_reserved": int(res), "peak_rss": int(peak_rss),
            "rss": rss_bytes(), "allocated": int(cur_a), "reserved": int(cur_r)}


def gather(obj):
    """all_gather_object over ranks (a list with one entry per rank); [obj] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's value on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
