"""Helpers for the trainer tests (subprocess runner, env)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from vramplan.contract import ENV_TEST_FREE_BYTES, ENV_TEST_INJECT_OOM_AT_STEP

REPO = Path(__file__).resolve().parents[2]


def train_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", ENV_TEST_FREE_BYTES,
              ENV_TEST_INJECT_OOM_AT_STEP):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def base_args(tiny: Path, out: Path, *more: str) -> list[str]:
    return ["--model", str(tiny / "model"), "--dataset", str(tiny / "data.json"), "--images", str(tiny / "images"),
            "--output", str(out), "--compute-dtype", "fp32", "--lr", "5e-3", *more]


def run_train(args: list[str], env: dict | None = None, timeout: float = 180, torchrun: int = 0,
              port: int = 29631) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               f"--master_port={port}", "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or train_env(), cwd=str(REPO))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trained_runs(tok, item: dict) -> list[str]:
    """The decoded runs of consecutive trained tokens of an encoded record (where labels equal input_ids;
    asserted): exactly the assistant answers with their end tokens when the masking is right."""
    from train.data import IGNORE

    runs, cur = [], []
    for i, lab in zip(item["input_ids"], item["labels"], strict=True):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]
