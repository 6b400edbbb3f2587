"""Training time (docs/estimate.md#time).

FLOPs per LLM token: a frozen weight costs 2 FLOPs/param forward + 2 backward (the input gradient; its
weight-gradient GEMM is skipped), a trainable one 2 + 4 (Kaplan et al. 2020, arXiv:2001.08361; EleutherAI
Transformer Math 101). Gradient checkpointing recomputes the forward (+2 per param; llm-analysis).
Attention score/value GEMMs come from the text family (forward; x3 for forward + backward, +1 recompute).
The vision tower runs forward only unless it carries LoRA.
time = FLOPs / (GPUs x dense peak x utilisation) + ZeRO-3 all-gathers + offload transfer and CPU-Adam time
       + a fixed per-micro-step overhead (priors.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.families import module_for
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.priors import (
    CPU_ADAM_PARAMS_PER_S,
    CPU_TFLOPS,
    MFU_PRIOR,
    QLORA_SLOWDOWN,
    STEP_OVERHEAD_S,
    ZERO3_COMM_EFFICIENCY,
)
from vramplan.estimate.specs import HardwareSpec, ModelSpec
from vramplan.estimate.types import Quant, Strategy, offloads_optimizer, offloads_params


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float
    steps: int
    flops_per_step: float
    compute_s_per_step: float
    comm_s_per_step: float
    offload_s_per_step: float
    overhead_s_per_step: float
    tokens_per_s: float
    mfu: float
    peak_tflops: float


def flops_per_sample(model: ModelSpec, g: ParamGroups, seq: int, images: float, grad_ckpt: bool,
                     vision_trainable: bool) -> float:
    from vramplan.estimate.params import count_params

    t = model.text
    c = count_params(model)
    llm_params = c.llm_total
    llm_trainable = g.trainable_llm_lora + g.trainable_llm_full
    fwd = 2 * (llm_params + g.trainable_llm_lora)
    bwd = 2 * llm_params + 4 * llm_trainable + 2 * g.trainable_llm_lora  # input grads + weight grads
    per_token = fwd + bwd + (fwd if grad_ckpt else 0)
    attn = module_for(t).attention_flops_per_token(t, seq) * (3 + (1 if grad_ckpt else 0))
    total = seq * (per_token + attn)
    if model.vision is not None and images:
        v_tok = module_for(model.vision).tokens_per_image(model.vision)
        v_fwd = 2 * c.vision_total * v_tok
        v = v_fwd * (3 + (1 if grad_ckpt else 0)) if vision_trainable else v_fwd
        total += images * v
    return float(total)


def estimate_time(model: ModelSpec, hw: HardwareSpec, g: ParamGroups, s: Strategy, *, seq: int, images: float,
                  samples: int, epochs: int, quant: str, compute_dtype: str, vision_trainable: bool,
                  device: str = "cuda") -> TimeEstimate:
    global_batch = s.micro_batch * s.grad_accum * s.gpus
    steps = max(1, -(-samples * epochs // global_batch))
    flops_step = flops_per_sample(model, g, seq, images, s.grad_ckpt, vision_trainable) * global_batch
    peak = (hw.bf16_tflops if compute_dtype == "bf16" else hw.fp16_tflops) * 1e12
    if device == "cpu":
        peak = CPU_TFLOPS * 1e12
    mfu = MFU_PRIOR * (QLORA_SLOWDOWN if quant == Quant.NF4 else 1.0)
    compute = flops_step / (s.gpus * peak * mfu) if peak > 0 else float("inf")

    comm = 0.0
    bw_inter = hw.interconnect_gbps * 1e9 * ZERO3_COMM_EFFICIENCY
    if s.zero_stage == 3 and s.gpus > 1 and bw_inter > 0:
        # all-gather every layer's weights in forward, backward (and recompute): S*(n-1)/n / bandwidth per pass
        wbytes = g.quantized_bytes + (g.frozen_params + g.trainable) * 2
        passes = (3 if s.grad_ckpt else 2) * s.grad_accum  # forward, backward (+ recompute) per micro-step
        comm = passes * wbytes * (s.gpus - 1) / s.gpus / bw_inter
    offload = 0.0
    if offloads_optimizer(s.offload):
        host = hw.host_link_gbps * 1e9
        per_node = max(1, s.gpus // max(1, s.nodes))
        # grads down (fp32 after conversion, 4 B) + updated 16-bit params up (2 B), per rank share, over the host link
        xfer = g.trainable * (4 + 2) / s.gpus
        offload += xfer / host if host else 0.0
        # CPU Adam: the node's cores step the partitions of all its ranks
        offload += g.trainable * per_node / s.gpus / CPU_ADAM_PARAMS_PER_S
    if offloads_params(s.offload):
        host = hw.host_link_gbps * 1e9
        wbytes = g.quantized_bytes + (g.frozen_params + g.trainable) * 2
        # each rank uploads its partition of every layer per pass before the all-gather
        passes = (3 if s.grad_ckpt else 2) * s.grad_accum
        offload += passes * wbytes / s.gpus / host if host else 0.0
    overhead = STEP_OVERHEAD_S.get(device, 0.02) * s.grad_accum
    per_step = compute + comm + offload + overhead
    total = per_step * steps
    tokens_per_s = (global_batch * seq) / per_step if per_step else 0.0
    return TimeEstimate(total, steps, flops_step, compute, comm, offload, overhead, tokens_per_s, mfu, peak / 1e12)
