"""Training time, built from named mechanisms (docs/estimate.md#time).

Per GPU and micro-step (n = micro-batch x tokens per sample):
  GPU time = sum over passes (forward, backward, recompute) of max(FLOPs / (peak x utilisation),
             weight bytes / HBM bandwidth)                 compute, or the weight-bandwidth bound
           + non-GEMM (elementwise) bytes / HBM bandwidth   norms, rotary, activations (fused when compiled)
           + 4-bit dequantization per pass                 (bitsandbytes dequantizes every weight each pass)
  overlapped with the collectives of the micro-step          (ZeRO-3/FSDP all-gathers, gradient reduce-scatter)
  + host time of the eager ops, per layer per pass           (small kernels wait on their launch)
  + offload traffic per micro-step + a fixed trainer-loop cost.
Per optimizer step: the optimizer (GPU AdamW bound by HBM, or CPU Adam from the host's cores), the step-end
collectives and offload uploads. Total = steps x step time. FLOPs: timing_flops.py; data movement: timing_comm.py;
the band around the figure: timing_band.py. Constants: priors.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.estimate import timing_band
from vramplan.estimate.families import module_for, targeted
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.priors import (
    CPU_TFLOPS,
    DEQUANT_BYTES_PER_WEIGHT,
    HOST_OP_S,
    KBIT_FORWARD_OPS,
    LAYER_FORWARD_OPS,
    LORA_FORWARD_OPS,
    OPTIMIZER_BYTES_PER_PARAM,
    STEP_OVERHEAD_S,
    UTILISATION_BY_GENERATION,
    UTILISATION_DEFAULT,
)
from vramplan.estimate.specs import HardwareSpec, LoraSpec, ModelSpec
from vramplan.estimate.timing_comm import bus_bytes_per_s, collective_s_per_micro_step, offload_s
from vramplan.estimate.timing_flops import elementwise_bytes_per_token, sample_work
from vramplan.estimate.types import COMPUTE_BYTES, Quant, Strategy, offloads_optimizer

SOURCES = {
    "compute": "model FLOPs (6 per trainable, 4 per frozen matmul weight; Kaplan et al. 2020, Narayanan et al. "
               "2021) / (peak x utilisation by GPU generation, priors.py)",
    "recompute": "gradient checkpointing: one more forward, at the same utilisation",
    "elementwise": "norms, rotary, activations and residuals move their tensors through HBM: bytes per token "
                   "(counted from transformers modeling_llama.py; fused by torch.compile) / HBM bandwidth",
    "weight_bandwidth": "passes where reading the weights (bytes / HBM bandwidth) takes longer than the FLOPs",
    "dequant_4bit": "bitsandbytes dequantizes every 4-bit weight per pass: 12 B of HBM traffic per weight "
                    "(priors.py DEQUANT_BYTES_PER_WEIGHT)",
    "collectives": "ZeRO-3/FSDP all-gathers and gradient reduce-scatter over the real link, overlapped with "
                   "compute (nccl-tests ring formula)",
    "host_ops": "eager ops per layer per pass x 10 us of host time (priors.py HOST_OP_S)",
    "offload": "gradients to CPU every micro-step, weights back per step, over the host link (ZeRO-Offload)",
    "cpu_adam": "CPU Adam: trainable share / (host cores x 1e8 params/s per core; ZeRO-Offload Table 2)",
    "optimizer": "GPU AdamW: 16 B per trainable parameter at HBM bandwidth",
    "step_end_collectives": "ZeRO-1/2 all-gather of the updated 16-bit weights after the optimizer step",
    "loop_overhead": "trainer loop, data loading, loss per micro-step (priors.py STEP_OVERHEAD_S)",
}


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
    mfu: float  # the utilisation prior used
    peak_tflops: float
    terms: dict = field(default_factory=dict)  # mechanism -> seconds per optimizer step
    regime: str = ""  # the band's regime (timing_band.py)
    link: str = ""  # the link the collectives run over


def utilisation(hw: HardwareSpec) -> float:
    """Achieved fraction of the dense peak by the training GEMMs, by GPU generation (priors.py)."""
    return UTILISATION_BY_GENERATION.get(hw.compute_capability, UTILISATION_DEFAULT)


def forward_ops_per_layer(model: ModelSpec, lora: LoraSpec | None, quant: str) -> int:
    """Eager ops of one decoder layer's forward: the layer, its LoRA adapters, its 4-bit Linears."""
    groups = module_for(model.text).linear_groups(model.text)
    per_layer = [(g, g.count / model.text.num_layers) for g in groups]  # per-expert Linears: E per layer
    adapted = sum(n for g, n in per_layer if lora is not None and targeted(g, lora.targets))
    kbit = sum(n for _, n in per_layer) if quant in Quant.KBIT else 0
    return LAYER_FORWARD_OPS + round(LORA_FORWARD_OPS * adapted + KBIT_FORWARD_OPS * kbit)


def _micro_step(model, hw, g, s, *, seq, images, quant, compute_dtype, vision_trainable, lora, device,
                compiled=False) -> dict:
    """Seconds of each mechanism in one micro-step on one GPU (collectives excluded)."""
    w = sample_work(model, g, seq, images, s.grad_ckpt, vision_trainable)
    cb = COMPUTE_BYTES.get(compute_dtype, 2)
    peak = (CPU_TFLOPS if device == "cpu" else (hw.bf16_tflops if compute_dtype == "bf16" else hw.fp16_tflops))
    rate = peak * 1e12 * utilisation(hw)
    hbm = hw.hbm_bandwidth_gbps * 1e9
    if rate <= 0:
        return {"compute": float("inf")}
    mb = s.micro_batch
    dense = max(0, w.matmul_params - g.quantized_params) * cb  # 16-bit weights every pass reads
    passes = {"forward": (w.forward_flops, dense), "backward": (w.backward_flops, dense),
              "recompute": (w.recompute_flops, dense if s.grad_ckpt else 0)}
    out = {"compute": 0.0, "recompute": 0.0, "weight_bandwidth": 0.0}
    for name, (flops, nbytes) in passes.items():
        t_flops = flops * mb / rate
        t_bytes = nbytes / hbm if (hbm and device != "cpu") else 0.0
        out["recompute" if name == "recompute" else "compute"] += t_flops
        out["weight_bandwidth"] += max(0.0, t_bytes - t_flops)
    n_pass = 3 if s.grad_ckpt else 2
    if device == "cpu":
        return out
    # non-GEMM ops (norms, rotary, activations, residuals) are bandwidth-bound: forward, 2x in backward, recompute
    ew = elementwise_bytes_per_token(model, compiled) * mb * seq * (1 + 2 + (1 if s.grad_ckpt else 0))
    out["elementwise"] = ew / hbm
    if quant == Quant.NF4 and g.quantized_params and hbm:
        out["dequant_4bit"] = n_pass * g.quantized_params * DEQUANT_BYTES_PER_WEIGHT / hbm
    fwd_ops = forward_ops_per_layer(model, lora, quant)
    # forward + backward (about 2 launches per forward op) + the recompute's forward
    out["host_ops"] = model.text.num_layers * fwd_ops * (1 + 2 + (1 if s.grad_ckpt else 0)) * HOST_OP_S
    if model.vision is not None and images:
        out["host_ops"] += model.vision.num_layers * LAYER_FORWARD_OPS * HOST_OP_S
    return out


def estimate_time(model: ModelSpec, hw: HardwareSpec, g: ParamGroups, s: Strategy, *, seq: int, images: float,
                  samples: int, epochs: int, quant: str, compute_dtype: str, vision_trainable: bool,
                  device: str = "cuda", lora: LoraSpec | None = None, host_cores: int = 0,
                  compiled: bool = False) -> TimeEstimate:
    """The time of the whole run: steps x (accumulated micro-steps + the optimizer step), per mechanism."""
    global_batch = s.micro_batch * s.grad_accum * s.gpus
    steps = max(1, -(-samples * epochs // global_batch))
    cb = COMPUTE_BYTES.get(compute_dtype, 2)
    micro = _micro_step(model, hw, g, s, seq=seq, images=images, quant=quant, compute_dtype=compute_dtype,
                        vision_trainable=vision_trainable, lora=lora, device=device, compiled=compiled)
    gpu = sum(v for k, v in micro.items() if k != "host_ops")
    off = offload_s(hw, g, s, cb, host_cores) if device != "cpu" else {"micro": 0.0, "step": 0.0, "cpu_adam": 0.0}
    loop = STEP_OVERHEAD_S.get(device, 0.02)
    terms = {k: v * s.grad_accum for k, v in micro.items()}
    coll_total = 0.0
    step_end = 0.0
    for last in ([False] * (s.grad_accum - 1) + [True]):
        coll = collective_s_per_micro_step(hw, g, s, cb, last) if device != "cpu" else {}
        during = sum(v for k, v in coll.items() if k != "param_allgather")  # DDP all-reduces during backward
        # with peer-to-peer the copy engines move the data while the GPU computes (FSDP/DeepSpeed prefetch);
        # staged through host RAM (no P2P) the transfer is not hidden
        coll_total += max(0.0, during - gpu) if hw.gpu_p2p else during
        step_end += coll.get("param_allgather", 0.0)
    terms["collectives"] = coll_total
    terms["step_end_collectives"] = step_end
    terms["offload"] = off["micro"] * s.grad_accum + off["step"]
    terms["cpu_adam"] = off["cpu_adam"]
    if not offloads_optimizer(s.offload) and device != "cpu" and hw.hbm_bandwidth_gbps:
        shard = s.gpus if s.zero_stage >= 1 else 1
        terms["optimizer"] = g.trainable / shard * OPTIMIZER_BYTES_PER_PARAM / (hw.hbm_bandwidth_gbps * 1e9)
    terms["loop_overhead"] = loop * s.grad_accum
    per_step = sum(terms.values())
    w = sample_work(model, g, seq, images, s.grad_ckpt, vision_trainable)
    flops_step = (w.model_flops + w.recompute_flops) * global_batch
    peak = CPU_TFLOPS if device == "cpu" else (hw.bf16_tflops if compute_dtype == "bf16" else hw.fp16_tflops)
    compute = sum(terms.get(k, 0.0) for k in ("compute", "recompute", "weight_bandwidth", "dequant_4bit",
                                               "elementwise"))
    comm = terms["collectives"] + terms["step_end_collectives"]
    offload = terms["offload"] + terms["cpu_adam"]
    tokens_per_s = (global_batch * seq) / per_step if per_step else 0.0
    link = bus_bytes_per_s(hw, s)[1] if s.gpus > 1 else ""
    rest = per_step - compute - comm - offload
    return TimeEstimate(per_step * steps, steps, flops_step, compute, comm, offload, rest,
                        tokens_per_s, utilisation(hw), peak, {k: v for k, v in terms.items() if v},
                        timing_band.training_regime(s.micro_batch * seq), link)


def time_detail(t: TimeEstimate, seconds: float, calibration: dict | None = None) -> dict:
    """The candidate's `time_detail` (--json): per-step figures, each mechanism with its source, the band."""
    scale = seconds / t.seconds if t.seconds else 1.0
    return {"steps": t.steps, "flops_per_step": t.flops_per_step, "compute_s_per_step": t.compute_s_per_step,
            "comm_s_per_step": t.comm_s_per_step, "zero3_comm_s_per_step": t.comm_s_per_step,
            "offload_s_per_step": t.offload_s_per_step, "overhead_s_per_step": t.overhead_s_per_step,
            "tokens_per_s": t.tokens_per_s / scale if scale else t.tokens_per_s, "utilisation_prior": t.mfu,
            "peak_tflops": t.peak_tflops, "link": t.link,
            "terms_s_per_step": {k: v * scale for k, v in t.terms.items()},
            "term_sources": {k: SOURCES[k] for k in t.terms if k in SOURCES},
            "band": timing_band.band(seconds, t.regime, calibration)}
