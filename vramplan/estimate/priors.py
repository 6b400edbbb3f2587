"""Every named overhead constant of the estimate, with its source (docs/estimate.md#priors).

These are priors, not facts of the model: they stand for the runtime's own overheads (CUDA context,
allocator caching, Python processes, utilisation). Each is a documented mechanism with the measurement
or upstream code it comes from; `vramplan calibrate` reports how far off they were on a user's machine.
Exact byte counts of the model and its states are not here (see params.py, gpu_memory.py, host.py).
"""

from __future__ import annotations

GiB = 2**30
MiB = 2**20

# --- GPU memory overheads (docs/estimate.md#peak-and-overheads) -------------------------------------------
CUDA_CONTEXT_BYTES = int(0.75 * GiB)
"""CUDA context + cuBLAS/cuDNN workspaces per process: vramcalc's measured 0.75 GB (RTX A6000, CUDA 13);
transformers' "Model training anatomy" docs measure 1343 MB including kernels; gpu_poor uses 650 MB."""

NCCL_BYTES_PER_RANK = int(0.5 * GiB)
"""NCCL/HCCL communicator buffers per rank, multi-GPU runs only (NCCL docs: NCCL_BUFFSIZE 4 MiB per channel
and peer; 0.3-1 GB seen per rank in practice)."""

ALLOCATOR_RESERVE_FACTOR = 1.12
"""torch caching allocator: reserved / peak allocated. fms-acceleration's a100_80gb.csv benchmark has
nvidia-smi / peak-allocated with a median of 1.26 including the CUDA context; 1.12 once the context is split out."""

# --- host processes (docs/estimate.md#cpu-ram-and-disk) -----------------------------------------------------
PROCESS_BASE_RSS = 3 * GiB
"""RSS of one training rank before any model state: Python + torch + CUDA libraries + transformers/peft/deepspeed."""

CPU_PROCESS_BASE_RSS = 450 * MiB
"""The same without CUDA: the bundled trainer on the tiny LLaVA peaks at about 467 MiB RSS on CPU
(measured by `vramplan run --demo`, benchmarks/results/)."""

HF_SHARD_BYTES = 5 * 10**9
"""transformers `save_pretrained(max_shard_size="5GB")` default: loading holds about one shard at a time."""

DEEPSPEED_CPU_FACTOR = 1.5
"""DeepSpeed's `additional_buffer_factor` for CPU-side optimizer states (runtime/zero/stage_1_and_2.py
estimate_zero2_model_states_mem_needs)."""

WORKER_RSS = int(0.5 * GiB)
"""One DataLoader worker: a forked interpreter plus image-decode buffers (prior)."""

CHECKPOINT_EXTRA_BYTES = 100 * 10**3
"""scheduler.pt, rng_state, trainer_state.json, training_args.bin, README, MANIFEST.json: about 32 KB in the
demo's checkpoints; more with DeepSpeed (`latest`, per-rank rng states)."""

LOG_BYTES = 50 * 10**6
"""metrics.jsonl, summary.json, launch.sh, plan.json, trainer.log."""

# --- time (docs/estimate.md#time) ----------------------------------------------------------------------------
MFU_PRIOR = 0.40
"""Model FLOPs / peak: fms-acceleration Mistral-7B LoRA on 1xA100 reaches 3324 tok/s (~46% with the 6P
convention); LLaVA-1.5-13B pretraining on 8xA100 in ~5.5 h (LLaVA README) is 40-55%."""

QLORA_SLOWDOWN = 0.80
"""bitsandbytes dequantizes each 4-bit weight per matmul: fms-acceleration 2904 vs 3324 tok/s (0.87),
torchtune 2413 vs 3083 tok/s (0.78)."""

ZERO3_COMM_EFFICIENCY = 0.7
"""Achieved fraction of the interconnect bandwidth for ZeRO-3 all-gathers (prior)."""

CPU_ADAM_PARAMS_PER_S = 1.0e9
"""DeepSpeedCPUAdam throughput per node (prior; depends on cores and AVX width)."""

CPU_TFLOPS = 0.2
"""A CPU as the training device (tests, the demo): effective fp32 training TFLOPS of a few cores (prior)."""

STEP_OVERHEAD_S = {"cuda": 0.02, "npu": 0.03, "cpu": 0.06}
"""Fixed cost per micro-step: Python, the HF Trainer loop, kernel launches, data loading. The CPU figure is
measured: `vramplan run --demo` takes about 63 ms per step on 2 idle cores."""

HBM_EFFICIENCY = 0.6
"""Achieved fraction of HBM bandwidth in HF `generate()` decoding (prior)."""

# --- DeepSpeed config (docs/estimate.md#deepspeed-config) ---------------------------------------------------
DEFAULT_BUCKET_ELEMS = 200_000_000
"""ZeRO-1/2 reduce and all-gather bucket, in elements. DeepSpeed's own default is 5e8 (2 GB of bf16, x2 with
overlap_comm); smaller buckets cost a little overlap and bound the transient (transformers DeepSpeed docs)."""
