"""Per-GPU peak memory for one candidate: ZeRO stage x offload x GPU count x micro-batch x checkpointing.

Phase model (llm-analysis, vramcalc; docs/estimate.md#peak-and-overheads):
    peak_allocated = persistent + max(train-step transient, optimizer-step transient, load transient)
    nvidia_smi     = peak_allocated * ALLOCATOR_RESERVE_FACTOR + CUDA context (+ NCCL per rank if >1 GPU)
Persistent model states follow the ZeRO paper (Rajbhandari et al. 2019, arXiv:1910.02054 §5) and
DeepSpeed's estimators (runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs, stage3.py
estimate_zero3_model_states_mem_needs), per parameter group: frozen weights are replicated under stages
0-2 and partitioned under 3 (docs/estimate.md#model-states). Under DeepSpeed with bf16/fp16 the engine casts
the whole module to the 16-bit dtype (runtime/engine.py `_configure_distributed_model`: module.bfloat16()),
so every non-quantized weight is 16-bit on the GPU and trainable ones get an fp32 master copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.estimate.activations import LOGIT_PEAK_BYTES, ActivationBreakdown
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.priors import (
    ALLOCATOR_RESERVE_FACTOR,
    CPU_PROCESS_BASE_RSS,
    CUDA_CONTEXT_BYTES,
    NCCL_BYTES_PER_RANK,
)
from vramplan.estimate.types import DsBuckets, Quant, Strategy, offloads_optimizer, offloads_params

ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq
MASTER_BYTES = 4  # fp32 master weights
FP32_GRAD_BYTES = 4  # DeepSpeed's fp32 gradient partition: estimate_zero2 charges 2 B replicated + 18 B / GPUs
#   per parameter = 2 (16-bit grad) + 4 (master) + 8 (Adam) + 4 (this) (runtime/zero/stage_1_and_2.py)

ZERO_SOURCE = "ZeRO paper §5 (arXiv:1910.02054); DeepSpeed estimate_zero2/3_model_states_mem_needs"


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


def _weights(g: ParamGroups, s: Strategy, bc: int, quant: str) -> list[Component]:
    n, part_w, off_par = s.gpus, s.zero_stage == 3, offloads_params(s.offload)
    out = []
    if g.quantized_bytes:
        qb = 0 if off_par else (_div(g.quantized_bytes, n) if part_w else g.quantized_bytes)
        out.append(Component(
            "weights_quantized", int(qb), "persistent",
            f"{quant} storage incl. quant state" + (" / GPUs (ZeRO-3 partitions it)" if part_w else "")
            + (" -> CPU (offload params)" if off_par else ""),
            "QLoRA arXiv:2305.14314 §3; bitsandbytes quantize_4bit (blocksize 64, nested 256)"))
    fb = g.frozen_params * bc
    out.append(Component("weights_frozen", 0 if off_par else (_div(fb, n) if part_w else fb), "persistent",
                         f"frozen params x {bc} B (module cast to the compute dtype)"
                         + (" / GPUs" if part_w else " (replicated under ZeRO 0-2)"), ZERO_SOURCE))
    T = g.trainable
    out.append(Component("weights_trainable", 0 if off_par else (_div(T * bc, n) if part_w else T * bc), "persistent",
                         f"trainable params x {bc} B" + (" / GPUs" if part_w else ""), ZERO_SOURCE))
    return out


def _optimizer_states(g: ParamGroups, s: Strategy, bc: int) -> list[Component]:
    """Gradients, fp32 master + Adam states, and DeepSpeed's fp32 gradient partition."""
    n, z, T, off_opt = s.gpus, s.zero_stage, g.trainable, offloads_optimizer(s.offload)
    if off_opt:
        grads, gform = 0, "reduced into pinned CPU buffers (offload_optimizer)"
    elif z == 3:
        grads = 0
        gform = "reduced straight into the fp32 gradient partition (counted there), as DeepSpeed's stage-3 estimator"
    elif z == 2:
        grads, gform = _div(T * bc, n), f"trainable x {bc} B / GPUs (ZeRO-2 partitions gradients)"
    else:
        grads, gform = T * bc, f"trainable x {bc} B (full gradients under ZeRO 0-1)"
    if off_opt:
        opt, oform = 0, "fp32 master + Adam m, v live in CPU RAM (offload_optimizer)"
    elif z >= 1:
        opt, oform = _div(T * (MASTER_BYTES + ADAM_STATE_BYTES), n), "trainable x (4 master + 8 Adam) B / GPUs"
    else:
        opt = T * (MASTER_BYTES + ADAM_STATE_BYTES)
        oform = "trainable x (4 master + 8 Adam) B (ZeRO-0: DeepSpeed bf16 optimizer, not partitioned)"
    fp32g = 0 if off_opt else (T * FP32_GRAD_BYTES if z == 0 else _div(T * FP32_GRAD_BYTES, n))
    return [
        Component("gradients", int(grads), "persistent", gform, ZERO_SOURCE),
        Component("optimizer_states", int(opt), "persistent", oform, ZERO_SOURCE + "; docs/estimate.md#model-states"),
        Component("fp32_grad_partition", int(fp32g), "persistent",
                  "trainable x 4 B fp32 gradients the optimizer steps on" + ("" if z == 0 else " / GPUs"),
                  "DeepSpeed stage_1_and_2 single_partition_of_fp32_groups grads; the 18 B/param of estimate_zero2"),
    ]


def _deepspeed_buffers(g: ParamGroups, s: Strategy, b: DsBuckets, bc: int) -> Component:
    z, T = s.zero_stage, g.trainable
    if z in (1, 2):
        rb = min(b.reduce_bucket, max(T, 1)) * bc * (2 if b.overlap_comm else 1)
        ab = min(b.allgather_bucket, max(T, 1)) * bc
        size = rb + ab
        form = (f"reduce bucket {b.reduce_bucket:.3g} el x {bc} B"
                f"{' x 2 (overlap_comm double-buffers)' if b.overlap_comm else ''}"
                f" + allgather bucket {b.allgather_bucket:.3g} el x {bc} B, each capped at the trainable count")
    elif z == 3:
        layer_bytes = g.decoder_layer_params * bc
        if g.quantized_params:
            layer_bytes = int(g.decoder_layer_params * bc * g.quantized_bytes / max(1, g.quantized_params * bc))
        live = min(b.stage3_max_live_parameters * bc, 2 * layer_bytes + b.stage3_prefetch_bucket * bc)
        size = live + min(b.reduce_bucket, max(T, 1)) * bc
        form = "gathered params: min(stage3_max_live_parameters, 2 decoder layers + prefetch bucket) + reduce bucket"
    else:
        size, form = 0, "no ZeRO buckets"
    return Component("deepspeed_buffers", int(size), "transient", form,
                     "transformers DeepSpeed docs (bucket sizes); docs/estimate.md#peak-and-overheads")


def _activation_transients(
    g: ParamGroups, act: ActivationBreakdown, s: Strategy, bc: int, quant: str
) -> list[Component]:
    out = [
        Component(
            "activations_saved",
            int(act.llm_saved + act.vision_saved + act.projector_saved + act.final_norm_saved),
            "transient",
            "decoder layers"
            + (" inputs only (checkpointing)" if s.grad_ckpt else "")
            + " + vision LoRA layers + projector, per micro-batch",
            "Korthikanti 2022 (arXiv:2205.05198); measured, docs/estimate.md#activations",
        ),
        Component(
            "logits_loss_peak",
            act.logits_peak,
            "transient",
            f"{LOGIT_PEAK_BYTES} B x tokens x vocab at the loss backward (fp32 log-softmax + its gradients; "
            "HF Trainer has dropped the 16-bit logits)",
            "transformers trainer.py compute_loss + loss_utils.py ForCausalLMLoss; docs/estimate.md#activations",
        ),
    ]
    if act.llm_recompute:
        out.append(Component("recompute_layer", act.llm_recompute, "transient",
                             "one decoder layer's activations while it is recomputed",
                             "gradient checkpointing; docs/estimate.md#activations"))
    if g.quantized_bytes and quant == Quant.NF4:
        out.append(Component("dequant_transient", int(g.largest_linear_elems * bc), "transient",
                             "largest 4-bit Linear dequantized to the compute dtype per matmul",
                             "bitsandbytes MatMul4Bit (autograd/_functions.py)"))
    out.append(Component("vision_forward_transient", act.vision_transient, "transient",
                         "vision hidden states of every layer (LLaVA selects layer -2)",
                         "transformers CLIPEncoder output_hidden_states"))
    return out


def _phases(g: ParamGroups, s: Strategy, d: dict[str, int], load_bytes_per_param: int) -> dict[str, int]:
    """Allocated bytes at each phase of a step; the peak is the largest."""
    persistent = sum(d[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients",
                                    "optimizer_states", "fp32_grad_partition") if k in d)
    backward_peak = max(d["logits_loss_peak"], d.get("recompute_layer", 0) + d.get("dequant_transient", 0))
    # Before the engine exists the trainer holds the model as built: with k-bit training, peft's
    # prepare_model_for_kbit_training has upcast every non-quantized weight to fp32 (peft utils/other.py).
    load = 0
    if not offloads_params(s.offload):
        unpartitioned = (g.frozen_params + g.trainable) * load_bytes_per_param
        load = d.get("weights_quantized", 0) + (_div(unpartitioned, s.gpus) if s.zero_stage == 3 else unpartitioned)
    return {"forward/backward": persistent + d["activations_saved"] + backward_peak + d["deepspeed_buffers"],
            "vision forward": persistent + d["vision_forward_transient"] + d["deepspeed_buffers"],
            "optimizer step": persistent + d["deepspeed_buffers"],
            "model load": load}


def _overheads(peak: int, gpus: int, device: str) -> list[Component]:
    out = [Component("allocator_reserve", int(peak * (ALLOCATOR_RESERVE_FACTOR - 1)), "overhead",
                     f"peak allocated x {ALLOCATOR_RESERVE_FACTOR - 1:.2f} (caching-allocator blocks)",
                     "fms-acceleration a100_80gb.csv reserved/allocated; docs/estimate.md#priors")]
    if device == "cpu":
        out.append(Component("process_base", CPU_PROCESS_BASE_RSS, "overhead",
                             "Python + torch + transformers/peft/bitsandbytes loaded (CPU device: memory is RSS)",
                             "measured: tiny-LLaVA trainer peak RSS ~467 MiB; docs/estimate.md#priors"))
        return out
    out.append(Component("cuda_context", CUDA_CONTEXT_BYTES, "overhead", "CUDA context + library workspaces",
                         "vramcalc 0.75 GB; transformers docs 1343 MB; docs/estimate.md#priors"))
    if gpus > 1:
        out.append(Component("nccl_buffers", NCCL_BYTES_PER_RANK, "overhead", "NCCL/HCCL communicator buffers",
                             "0.3-1 GB per rank; docs/estimate.md#priors"))
    return out


def gpu_memory(g: ParamGroups, act: ActivationBreakdown, s: Strategy, buckets: DsBuckets, *,
               compute_bytes: int = 2, quant: str = Quant.NF4, device: str = "cuda",
               load_bytes_per_param: int = 2) -> GpuMemory:
    """Per-GPU peak memory of one candidate, as named components."""
    comps = (_weights(g, s, compute_bytes, quant) + _optimizer_states(g, s, compute_bytes)
             + [_deepspeed_buffers(g, s, buckets, compute_bytes)]
             + _activation_transients(g, act, s, compute_bytes, quant))
    phases = _phases(g, s, {c.name: c.bytes for c in comps}, load_bytes_per_param)
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    overheads = _overheads(peak, s.gpus, device)
    return GpuMemory(comps + overheads, int(peak), int(peak + sum(c.bytes for c in overheads)), peak_phase)
