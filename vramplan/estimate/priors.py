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
UTILISATION_BY_GENERATION = {"7.0": 0.50, "7.5": 0.45, "8.0": 0.60, "8.6": 0.60, "8.9": 0.70, "9.0": 0.50}
"""Achieved fraction of the dense tensor-core peak by the training GEMMs (model FLOPs; the recompute charged on
top, the non-GEMM ops in their own bandwidth term), by NVIDIA compute capability. A100 (8.0): fms-acceleration's
Mistral-7B LoRA on one A100 (scripts/benchmarks/refs/a100_80gb.csv, 3324 tokens/s) is 51% of peak counting every
FLOP incl. the recompute, Narayanan et al. 2021 (arXiv:2104.04473, Table 1) 52%; with the elementwise traffic of
that step (~15%) taken out, the GEMMs run at ~60%. Ada (8.9): its listed peak is the FP32-accumulate rate, which
cuBLAS nearly reaches; torchtune's README full fine-tune on an RTX 4090 (1650 tokens/s of Llama-3.1-8B, compiled,
with checkpointing) is 62% overall, ~70% for the GEMMs. H100 (9.0): Llama 3 (Dubey et al. 2024, arXiv:2407.21783,
Table 4) 38-43% BF16 MFU at scale, ~50% for the GEMMs. Ampere workstation/GeForce (8.6), Volta, Turing: priors."""

UTILISATION_DEFAULT = 0.40
"""A device of unknown generation (Ascend, a detected card without a profile): prior."""

DEQUANT_BYTES_PER_WEIGHT = 12.0
"""Effective HBM traffic per 4-bit weight per pass (forward, backward, recompute): bitsandbytes dequantizes every
NF4 weight to 16 bit before each matmul (bitsandbytes functional.py dequantize_4bit, autograd/_functions.py
MatMul4Bit.backward dequantizes again). The kernel reads 0.5 B and writes 2 B but reaches about a third of the
bandwidth: LitGPT's resource table (tutorials/resource-tables.md, A100-40GB, Llama-2-13B QLoRA vs LoRA, 6.38 vs
3.19 min per 1k micro-batches) gives 7.5 ms per 10^9 weights per pass = 12 B at 1,555 GB/s; QLoRA (Dettmers et al.
2023, arXiv:2305.14314) Table 13 reports the same order of slowdown."""

HOST_OP_S = 10e-6
"""Host time of one eager PyTorch op (Python, the dispatcher, autograd bookkeeping, cudaLaunchKernel): 5-25 us per
op; PyTorch's own operator micro-benchmarks (benchmarks/operator_benchmark) time ~3.3 us for the C++ dispatch of a
tiny op, and nn.Module calls add Python. Small kernels wait on it, so it adds to the GPU time."""

LAYER_FORWARD_OPS = 55
"""Eager ops of one decoder layer forward, counted in transformers models/llama/modeling_llama.py
(LlamaDecoderLayer.forward): 2 RMSNorms x 8, q/k/v/o and rotary (16), attention and its reshapes (~10),
gate/up/act/mul/down (5), 2 residual adds. Backward launches about 2 per forward op (autograd)."""

LORA_FORWARD_OPS = 6
"""Eager ops per LoRA-adapted Linear forward: dropout, A, B, scaling, add, the dtype cast (PEFT tuners/lora/layer.py
Linear.forward)."""

KBIT_FORWARD_OPS = 8
"""Extra eager ops per bitsandbytes 4-bit Linear forward: the input and bias casts, absmax dequantization (double
quant), NF4 dequantization or the 4-bit GEMV, the output cast, and the Python quant-state handling that costs as
much as a few ops (bitsandbytes nn/modules.py Linear4bit.forward, autograd/_functions.py matmul_4bit)."""

DECODE_HBM_EFFICIENCY = 0.85
"""Achieved fraction of the HBM bandwidth when streaming weights (large contiguous reads): STREAM-style copy
kernels reach 85-92% of the datasheet figure on A100/H100 (NVIDIA nvbandwidth; BabelStream results)."""

OPTIMIZER_BYTES_PER_PARAM = 16
"""GPU AdamW step, bytes read and written per trainable parameter (16-bit weight and grad, fp32 states;
torch/optim/adamw.py foreach path): bound by HBM bandwidth."""

CPU_ADAM_PARAMS_PER_S_PER_CORE = 1.0e8
"""DeepSpeedCPUAdam (csrc/adam/cpu_adam.cpp, AVX512): ZeRO-Offload (Ren et al. 2021, arXiv:2101.06840, Table 2)
steps 1e9 parameters in about 0.2 s on its 2-socket host, 1e8 parameters/s per core; torch's fused CPU AdamW is of
the same order."""

CPU_CORES_PER_GPU = 16
"""Host cores per GPU when the host is not this machine: DGX A100 has 2 x 64-core EPYC 7742 for 8 GPUs (NVIDIA DGX
A100 datasheet)."""

COLLECTIVE_EFFICIENCY = 0.77
"""Achieved NCCL bus bandwidth / link bandwidth for large all-gathers and reduce-scatters: nccl-tests
(doc/PERFORMANCE.md) on 8x A100 NVLink report about 230 of 300 GB/s."""

PCIE_NO_P2P_FACTOR = 0.33
"""Without peer-to-peer (GeForce cards, Ada/Ampere consumer boards), NCCL stages every transfer through host memory
(NCCL_P2P_DISABLE path, SHM transport): about a third of the PCIe bandwidth (Answer.AI FSDP-QLoRA notes on 2x 3090;
NCCL docs "SHM transport")."""

INTERNODE_GBPS = 25.0
"""Inter-node bandwidth per GPU when the profile gives none, GB/s one direction: one 200 Gb/s HDR InfiniBand NIC per
GPU (NVIDIA DGX A100 datasheet)."""

CPU_TFLOPS = 0.2
"""A CPU as the training device (tests, the demo): effective fp32 training TFLOPS of a few cores (prior)."""

STEP_OVERHEAD_S = {"cuda": 0.02, "npu": 0.03, "cpu": 0.06}
"""Fixed cost per micro-step beyond the layers: the trainer loop, data loading, the loss. The CPU figure is
measured: `vramplan run --demo` takes about 63 ms per step on 2 idle cores."""

# --- bitsandbytes (docs/estimate.md#activations) -------------------------------------------------------------
BNB_DROPS_KBIT_INPUT = (0, 43, 2)
"""The first bitsandbytes release whose MatMul4Bit no longer keeps its input A for backward
(autograd/_functions.py: ctx.tensors = (A, B) became (None, B)). The change is bitsandbytes PR #1270
("delete useless buffered activation"), merged 2024-07-16, after 0.43.1 (April 2024, whose MatMul4Bit still
keeps A); the maintainers announced it as the QLoRA memory fix of the 0.43.2/0.43.3 patch releases (July
2024). Earlier releases: Job.kbit_saves_inputs (families/llama.py kbit_input_bytes_per_token)."""


# --- DeepSpeed config (docs/estimate.md#deepspeed-config) ---------------------------------------------------
DEFAULT_BUCKET_ELEMS = 200_000_000
"""ZeRO-1/2 reduce and all-gather bucket, in elements. DeepSpeed's own default is 5e8 (2 GB of bf16, x2 with
overlap_comm); smaller buckets cost a little overlap and bound the transient (transformers DeepSpeed docs)."""
