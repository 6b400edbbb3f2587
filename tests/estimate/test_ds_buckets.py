"""--ds-buckets: the ZeRO-1/2 bucket sizes of a given DeepSpeed config, and what the pinned DeepSpeed allocates for
them (reduce buckets during backward only; the post-step all-gather needs no bucket)."""

from __future__ import annotations

import pytest

from vramplan.errors import UsageError
from vramplan.plan.request import EstimateOptions, parse_ds_buckets
from vramplan.plan.service import run_estimate

KW = dict(model="llava-v1.5-7b", recipe="full", zero=2, offload="none", micro_batch=1, seq_len=2048, grad_ckpt=True,
          gpus="8xA100-40G", headroom=0.0)


def test_grammar():
    assert parse_ds_buckets("auto,5e8") == (0, 500_000_000)
    assert parse_ds_buckets("200000000, 2e8") == (200_000_000, 200_000_000)
    for bad in ("5e8", "auto", "a,b", "1.5,2", "-1,5", "0,5e8", "1,2,3"):
        with pytest.raises(UsageError, match="--ds-buckets"):
            EstimateOptions(ds_buckets=bad)
    with pytest.raises(UsageError, match="--ds-buckets"):
        EstimateOptions(task="infer", ds_buckets="auto,5e8")


def test_auto_is_hidden_squared_and_the_config_carries_it():
    c = run_estimate(EstimateOptions(ds_buckets="auto,5e8", **KW)).candidates[0]
    zero = c.ds_config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096 and zero["allgather_bucket_size"] == 500_000_000
    # overlap_comm: two reduce buffers of 16-bit gradients, during backward
    assert c.vram_breakdown["deepspeed_buffers"] == 2 * 4096 * 4096 * 2


def test_buckets_are_not_alive_in_the_zero2_step():
    own = run_estimate(EstimateOptions(**KW)).candidates[0]
    big = run_estimate(EstimateOptions(ds_buckets="5e8,5e8", **KW)).candidates[0]
    assert big.vram_breakdown["deepspeed_buffers"] > own.vram_breakdown["deepspeed_buffers"]
    assert own.peak_phase == big.peak_phase == "optimizer step"
    assert own.vram_allocated_per_gpu_bytes == big.vram_allocated_per_gpu_bytes
