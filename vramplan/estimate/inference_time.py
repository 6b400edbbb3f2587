"""Inference time: prefill and decode tokens/s per weight dtype (docs/estimate.md#inference).

Decode, per generated token (batch sequences at once), summed over the GPUs the layers are split over
(device_map="auto" runs them one after the other):
  weights:   every weight byte read once / (HBM bandwidth x efficiency)        memory-bound (Transformer Math 101)
  attention: the KV cache read by the attention kernel; flash-attention and SDPA decode without split-KV run one
             thread block per (sequence, query head), so with fewer of them than SMs only that share of the
             bandwidth streams the cache (Dao 2023, FlashAttention-2 §3.2; the split-KV "Flash-Decoding" fixes
             it, transformers' generate() does not use it) - this term grows with context
  host:      eager ops per layer (plus the KV-cache update and the 4-bit kernels' extra ops) x the host time of
             an op: bitsandbytes 4-bit decodes slower than bf16 because of these ops, not the bytes.
Prefill: FLOPs of the prompt / (peak x utilisation) + the same host ops.
"""

from __future__ import annotations

from vramplan.estimate.families import module_for
from vramplan.estimate.priors import (
    DECODE_HBM_EFFICIENCY,
    HOST_OP_S,
    KBIT_FORWARD_OPS,
    LAYER_FORWARD_OPS,
)
from vramplan.estimate.specs import HardwareSpec, ModelSpec
from vramplan.estimate.timing import utilisation
from vramplan.estimate.timing_flops import llm_matmul_params

KV_UPDATE_OPS = 2  # DynamicCache.update: one cat for K, one for V (transformers cache_utils.py)
TOKEN_OPS = 20  # per generated token outside the layers: embedding, final norm, lm_head, sampling, stopping checks


def decode_terms(model: ModelSpec, hw: HardwareSpec, *, weight_bytes: float, context: int, batch: int,
                 act_bytes: int, kernel: str = "") -> dict[str, float]:
    """Seconds per decode step by mechanism. kernel: "bnb" (bitsandbytes int8/nf4 weights), "gptq"
    (fused int4 GEMV kernels: no extra ops), "" (16-bit weights)."""
    t = model.text
    hbm = hw.hbm_bandwidth_gbps * 1e9 * DECODE_HBM_EFFICIENCY
    if hbm <= 0:
        return {"weights": float("inf")}
    blocks = batch * t.num_attention_heads
    head_bytes = 2 * context * t.d_head * act_bytes  # K and V of one head for one sequence
    if hw.sm_count:
        waves = -(-blocks // hw.sm_count)
        attention = t.num_layers * waves * head_bytes / (hbm / hw.sm_count)
    else:
        attention = t.num_layers * batch * module_for(t).kv_bytes_per_token(t, act_bytes) * context / hbm
    ops = LAYER_FORWARD_OPS + KV_UPDATE_OPS
    if kernel == "bnb":
        ops += KBIT_FORWARD_OPS * len(module_for(t).linear_groups(t))
    return {"weights": weight_bytes / hbm, "attention": attention,
            "host_ops": (t.num_layers * ops + TOKEN_OPS) * HOST_OP_S}


def prefill_seconds(model: ModelSpec, hw: HardwareSpec, *, context: int, batch: int, compute_dtype: str) -> float:
    """The prompt's forward: FLOPs / (peak x utilisation) + the host ops of one pass."""
    t = model.text
    peak = (hw.bf16_tflops if compute_dtype == "bf16" else hw.fp16_tflops) * 1e12 * utilisation(hw)
    per_token = 2 * llm_matmul_params(model, active=True) + module_for(t).attention_flops_per_token(t, context)
    flops = batch * context * per_token
    host = (t.num_layers * LAYER_FORWARD_OPS + TOKEN_OPS) * HOST_OP_S
    return (flops / peak if peak > 0 else float("inf")) + host
