"""Per-GPU peak memory for one candidate: ZeRO stage x offload x GPU count x micro-batch x checkpointing.

Phase model (llm-analysis, vramcalc; estimation-formulas.md F10):
    peak_allocated = persistent + max(train-step transient, optimizer-step transient, load transient)
    nvidia_smi     = peak_allocated * ALLOCATOR_RESERVE_FACTOR + CUDA_CONTEXT (+ NCCL per rank if >1 GPU)
Persistent model states follow the ZeRO paper (Rajbhandari et al. 2019, arXiv:1910.02054 §5) and
DeepSpeed's estimators (stage_1_and_2.estimate_zero2_model_states_mem_needs, stage3.estimate_zero3_...),
applied per parameter group: frozen weights are replicated under stages 0-2 and partitioned under 3.
Under DeepSpeed with bf16/fp16 enabled the engine casts the whole module to the 16-bit dtype
(DeepSpeed engine `_configure_distributed_model`: module.bfloat16()), so every non-quantized weight is
16-bit on the GPU and trainable ones get an fp32 master copy in the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.estimate.activations import ActivationBreakdown
from vramplan.estimate.param_groups import ParamGroups

# Named overhead factors (documented priors; `vramplan calibrate` reports how far off they were).
CUDA_CONTEXT_BYTES = int(0.75 * 2**30)  # CUDA context + cuBLAS/cuDNN workspaces: vramcalc 0.75 GB (A6000,
#   CUDA 13); transformers model_memory_anatomy measured 1343 MB incl. kernels; gpu_poor 650 MB (F11)
NCCL_BYTES_PER_RANK = int(0.5 * 2**30)  # NCCL communicator buffers, multi-GPU only: 0.3-1 GB (F11)
ALLOCATOR_RESERVE_FACTOR = 1.12  # torch caching allocator reserved/allocated: fms-acceleration a100_80gb.csv
#   nvidia-smi/peak-alloc median 1.26 incl. the CUDA context; ~1.12 once the context is split out (F11)

ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq
MASTER_BYTES = 4  # fp32 master weights
FP32_GRAD_BYTES = 4  # DeepSpeed's fp32 gradient partition (the "18" in estimate_zero2 = 2+2+12+... ; F4)


@dataclass(frozen=True)
class Strategy:
    zero_stage: int  # 0..3
    offload: str  # "none" | "optimizer" | "optimizer+params"
    gpus: int  # data-parallel world size
    nodes: int
    micro_batch: int
    grad_accum: int
    grad_ckpt: bool


@dataclass(frozen=True)
class DsBuckets:
    """The bucket sizes (elements) of the DeepSpeed config vramplan generates (ds_config.py)."""

    reduce_bucket: int
    allgather_bucket: int
    overlap_comm: bool
    stage3_prefetch_bucket: int
    stage3_max_live_parameters: int


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    kind: str  # "persistent" | "transient" | "overhead"
    formula: str
    source: str


@dataclass
class GpuMemory:
    components: list[Component] = field(default_factory=list)
    peak_allocated: int = 0
    nvidia_smi: int = 0
    peak_phase: str = ""

    def as_dict(self) -> dict[str, int]:
        return {c.name: c.bytes for c in self.components}


def _div(x: float, n: int) -> int:
    return int(-(-x // n)) if n > 1 else int(x)


def gpu_memory(g: ParamGroups, act: ActivationBreakdown, s: Strategy, buckets: DsBuckets, *,
               compute_bytes: int = 2, quant: str = "nf4", device: str = "cuda",
               load_bytes_per_param: int = 2) -> GpuMemory:
    """Per-GPU peak memory of one candidate, as named components."""
    n, z, off = s.gpus, s.zero_stage, s.offload
    T = g.trainable
    bc = compute_bytes
    part_w = z == 3  # weights partitioned
    off_opt = off in ("optimizer", "optimizer+params")
    off_par = off == "optimizer+params"
    comps: list[Component] = []

    def add(name, b, kind, formula, source):
        comps.append(Component(name, int(b), kind, formula, source))

    zsrc = "ZeRO paper §5 (arXiv:1910.02054); DeepSpeed estimate_zero2/3_model_states_mem_needs"
    # --- persistent model states -------------------------------------------------------------
    if g.quantized_bytes:
        qb = 0 if off_par else (_div(g.quantized_bytes, n) if part_w else g.quantized_bytes)
        add("weights_quantized", qb, "persistent",
            f"{quant} storage incl. quant state" + (" / GPUs (ZeRO-3 partitions it)" if part_w else "")
            + (" -> CPU (offload params)" if off_par else ""),
            "QLoRA arXiv:2305.14314 §3; bitsandbytes quantize_4bit (blocksize 64, nested 256)")
    fb = g.frozen_params * bc
    add("weights_frozen", 0 if off_par else (_div(fb, n) if part_w else fb), "persistent",
        f"frozen params x {bc} B (module cast to the compute dtype)"
        + (" / GPUs" if part_w else " (replicated under ZeRO 0-2)"), zsrc)
    add("weights_trainable", 0 if off_par else (_div(T * bc, n) if part_w else T * bc), "persistent",
        f"trainable params x {bc} B" + (" / GPUs" if part_w else ""), zsrc)
    if off_opt:
        grads = 0
        gform = "reduced into pinned CPU buffers (offload_optimizer)"
    elif z == 3:
        grads = 0
        gform = "reduced straight into the fp32 gradient partition (counted there), as DeepSpeed's stage-3 estimator"
    elif z == 2:
        grads = _div(T * bc, n)
        gform = f"trainable x {bc} B / GPUs (ZeRO-2 partitions gradients)"
    else:
        grads = T * bc
        gform = f"trainable x {bc} B (full gradients under ZeRO 0-1)"
    add("gradients", grads, "persistent", gform, zsrc)
    if off_opt:
        opt = 0
        oform = "fp32 master + Adam m, v live in CPU RAM (offload_optimizer)"
    elif z >= 1:
        opt = _div(T * (MASTER_BYTES + ADAM_STATE_BYTES), n)
        oform = "trainable x (4 master + 8 Adam) B / GPUs"
    else:
        opt = T * (MASTER_BYTES + ADAM_STATE_BYTES)
        oform = "trainable x (4 master + 8 Adam) B (ZeRO-0: DeepSpeed bf16 optimizer, not partitioned)"
    add("optimizer_states", opt, "persistent", oform, zsrc + "; F4")
    fp32g = 0 if off_opt else (T * FP32_GRAD_BYTES if z == 0 else _div(T * FP32_GRAD_BYTES, n))
    add("fp32_grad_partition", fp32g, "persistent",
        "trainable x 4 B fp32 gradients the optimizer steps on" + ("" if z == 0 else " / GPUs"),
        "DeepSpeed stage_1_and_2 single_partition_of_fp32_groups grads; the 18 B/param of estimate_zero2 (F4)")

    # --- transients ----------------------------------------------------------------------------
    if z in (1, 2):
        rb = min(buckets.reduce_bucket, max(T, 1)) * bc * (2 if buckets.overlap_comm else 1)
        ab = min(buckets.allgather_bucket, max(T, 1)) * bc
        ds_buf = rb + ab
        dform = (f"reduce bucket {buckets.reduce_bucket:.3g} el x {bc} B"
                 f"{' x 2 (overlap_comm double-buffers)' if buckets.overlap_comm else ''}"
                 f" + allgather bucket {buckets.allgather_bucket:.3g} el x {bc} B, each capped at the trainable count")
    elif z == 3:
        layer_bytes = g.decoder_layer_params * bc
        if g.quantized_params:
            layer_bytes = int(g.decoder_layer_params * bc * g.quantized_bytes / max(1, g.quantized_params * bc))
        live = min(buckets.stage3_max_live_parameters * bc, 2 * layer_bytes + buckets.stage3_prefetch_bucket * bc)
        ds_buf = live + min(buckets.reduce_bucket, max(T, 1)) * bc
        dform = ("gathered params: min(stage3_max_live_parameters, 2 decoder layers + prefetch bucket)"
                 " + reduce bucket")
    else:
        ds_buf = 0
        dform = "no ZeRO buckets"
    add("deepspeed_buffers", ds_buf, "transient", dform, "transformers DeepSpeed docs (bucket sizes, F7)")

    add("activations_saved", act.llm_saved + act.vision_saved + act.projector_saved + act.final_norm_saved,
        "transient", "decoder layers" + (" inputs only (checkpointing)" if s.grad_ckpt else "")
        + " + vision LoRA layers + projector, per micro-batch", "activations.py; Korthikanti 2022; measured (F8)")
    add("logits_loss_peak", act.logits_peak, "transient", "14 B x tokens x vocab at the loss backward",
        "vramcalc measured 14 B/logit (F9)")
    if act.llm_recompute:
        add("recompute_layer", act.llm_recompute, "transient",
            "one decoder layer's activations while it is recomputed", "gradient checkpointing (F8)")
    if g.quantized_bytes and quant == "nf4":
        add("dequant_transient", g.largest_linear_elems * bc, "transient",
            "largest 4-bit Linear dequantized to the compute dtype per matmul", "bitsandbytes MatMul4Bit (F8)")
    add("vision_forward_transient", act.vision_transient, "transient",
        "CLIP hidden states of every layer (LLaVA selects layer -2)", "transformers CLIPEncoder output_hidden_states")

    persistent = sum(c.bytes for c in comps if c.kind == "persistent")
    d = {c.name: c.bytes for c in comps}
    backward_peak = max(d["logits_loss_peak"], d.get("recompute_layer", 0) + d.get("dequant_transient", 0))
    train_phase = persistent + d["activations_saved"] + backward_peak + d["deepspeed_buffers"]
    forward_vision = persistent + d["vision_forward_transient"] + d["deepspeed_buffers"]
    step_phase = persistent + d["deepspeed_buffers"]
    # Before the engine exists the trainer holds the model as built: with k-bit training, peft's
    # prepare_model_for_kbit_training has upcast every non-quantized weight to fp32 (PEFT utils/other.py).
    load_phase = 0
    if not off_par:
        load_phase = (d.get("weights_quantized", 0)
                      + (_div((g.frozen_params + T) * load_bytes_per_param, n) if part_w
                         else (g.frozen_params + T) * load_bytes_per_param))
    phases = {"forward/backward": train_phase, "vision forward": forward_vision, "optimizer step": step_phase,
              "model load": load_phase}
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]

    reserve = int(peak * (ALLOCATOR_RESERVE_FACTOR - 1))
    comps.append(Component("allocator_reserve", reserve, "overhead",
                           f"peak allocated x {ALLOCATOR_RESERVE_FACTOR - 1:.2f} (caching-allocator blocks)",
                           "fms-acceleration a100_80gb.csv reserved/allocated (F11)"))
    if device == "cpu":
        from vramplan.estimate.host import CPU_PROCESS_BASE_RSS

        overhead = CPU_PROCESS_BASE_RSS
        comps.append(Component("process_base", CPU_PROCESS_BASE_RSS, "overhead",
                               "Python + torch + transformers/peft/bitsandbytes loaded (CPU device: memory is RSS)",
                               "measured here: tiny-LLaVA trainer peak RSS ~467 MiB"))
        return GpuMemory(comps, int(peak), int(peak + reserve + overhead), peak_phase)
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES_PER_RANK if n > 1 else 0)
    comps.append(Component("cuda_context", CUDA_CONTEXT_BYTES, "overhead", "CUDA context + library workspaces",
                           "vramcalc 0.75 GB; transformers docs 1343 MB (F11)"))
    if n > 1:
        comps.append(Component("nccl_buffers", NCCL_BYTES_PER_RANK, "overhead", "NCCL/HCCL communicator buffers",
                               "estimation-formulas.md F11 (0.3-1 GB)"))
    return GpuMemory(comps, int(peak), int(peak + reserve + overhead), peak_phase)
