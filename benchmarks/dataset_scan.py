"""Benchmark: the dataset scan of `vramplan estimate --dataset` on 10,000 and 1,000,000 synthetic records.

What `estimate --dataset` runs on the file: `scan_dataset` (every record checked and measured) and
`token_stats` (vramplan/inputs/token_count.py: the true longest record over every record, tokenizing only
records whose byte bound could be the longest; mean and p95 over a 5,000-record sample). The records are
LLaVA-style chats of 20-400 characters, with one long record (2,000 words) at a seeded random position,
and the tokenizer is the tiny model's byte-level BPE (train/tiny.py). Each size runs in a fresh process so
its peak RSS is its own. CPU seconds are printed next to wall seconds: on a shared machine the wall time
says more about the neighbours.

    python benchmarks/dataset_scan.py            # both sizes
    python benchmarks/dataset_scan.py 10000      # one size
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (10_000, 1_000_000)
WORDS = ["the", "a", "image", "shows", "person", "dog", "cat", "red", "blue", "table", "window", "street", "car",
         "sky", "tree", "what", "where", "how", "many"]


def make_dataset(path: Path, n: int, seed: int = 0) -> int:
    """n records; returns the index of the long one."""
    rng = random.Random(seed)
    long_at = rng.randrange(n)
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            k = 2000 if i == long_at else rng.randint(4, 80)
            answer = " ".join(rng.choice(WORDS) for _ in range(k))
            rec = {"id": i, "image": f"{i % 100}.jpg",
                   "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                                     {"from": "gpt", "value": answer}]}
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")
    return long_at


def one(n: int) -> str:
    from train.tiny import build_tokenizer
    from vramplan.inputs.dataset import scan_dataset
    from vramplan.inputs.token_count import token_stats

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tokenizer(True).save_pretrained(tmp / "model")
        long_at = make_dataset(tmp / "data.json", n)
        mb = (tmp / "data.json").stat().st_size / 1e6
        t0, c0 = time.perf_counter(), time.process_time()
        rep = scan_dataset(tmp / "data.json", None, open_images=False)
        t1, c1 = time.perf_counter(), time.process_time()
        exact = token_stats(tmp / "data.json", "llama3", str(tmp / "model"))
        t2, c2 = time.perf_counter(), time.process_time()
        approx = token_stats(tmp / "data.json", "llama3", None)
        t3, c3 = time.perf_counter(), time.process_time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    assert rep.samples == n and exact["max"] > 2000  # the long record was found
    return (f"{n:>9,} records ({mb:.0f} MB, long record #{long_at}), wall s (CPU s):\n"
            f"    scan_dataset       {t1 - t0:7.2f} ({c1 - c0:7.2f})\n"
            f"    token_stats exact  {t2 - t1:7.2f} ({c2 - c1:7.2f})  longest {exact['max']} tokens; "
            f"{exact['tokenized']:,} records tokenized of {exact['records']:,}\n"
            f"    token_stats approx {t3 - t2:7.2f} ({c3 - c2:7.2f})  longest {approx['max']} tokens\n"
            f"    peak RSS {rss:.2f} GiB")


def main() -> None:
    if len(sys.argv) > 1:
        print(one(int(sys.argv[1])), flush=True)
        return
    for n in SIZES:
        subprocess.run([sys.executable, __file__, str(n)], check=True)


if __name__ == "__main__":
    main()
