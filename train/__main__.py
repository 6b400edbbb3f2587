"""`python -m train --plan plan.json` or flags; also under torchrun and the deepspeed launcher (--local_rank).

Exit codes: vramplan.contract.ExitCode, the README's exit-code table (0 ok, 2 usage, 6 out of memory, 7 disk full,
130 interrupted, 1 crash).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[train rank{rank}] %(levelname)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover
        pass


def _teardown() -> None:
    """barrier + destroy_process_group before exit (PyTorch torch/distributed/distributed_c10d.py
    destroy_process_group): without them ZeRO-3 ranks can abort at interpreter exit."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; never mask the run's exit code
        pass


def main(argv: list[str] | None = None) -> int:
    from train.config import add_flags, from_args
    from train.exit_codes import TrainError

    ap = argparse.ArgumentParser(prog="python -m train",
                                 description="QLoRA/LoRA trainer for LLaVA and decoder LLMs (see train/README.md)")
    add_flags(ap)
    ns = ap.parse_args(argv)
    if ns.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(ns.local_rank))
    _setup_logging()
    lws = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # torchrun sets OMP_NUM_THREADS=1 per worker (torch/distributed/run.py); the deepspeed launcher
    # (deepspeed/launcher/launch.py) leaves it unset, and N ranks x all cores oversubscribe the CPU
    if lws > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // lws))
    try:
        cfg = from_args(ns)
    except TrainError as e:
        print(f"train: error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return int(e.exit_code)
    from train.training import run

    try:
        code, _model = run(cfg)
    finally:
        _teardown()
    return code  # a usage error (exit 2) was said on one line (and its hint) where it was found


if __name__ == "__main__":
    sys.exit(main())
