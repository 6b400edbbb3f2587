"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q_norm/k_norm per head) with a sparse MoE MLP,
no shared expert.

transformers models/qwen3_moe/modeling_qwen3_moe.py: Qwen3's attention (families/qwen3.py: head_dim, q/k/v/o bias
= attention_bias, q_norm and k_norm), a router (Qwen3MoeTopKRouter) and fused experts of `moe_intermediate_size`
on each sparse layer, dense Qwen3MoeMLP on `mlp_only_layers`. The MoE accounting is Mixtral's
(families/mixtral.py), routing weights in the 16-bit compute dtype. PEFT 0.21 converts qwen3_moe like
qwen2_moe's checkpoints (transformers conversion_mapping.py maps qwen3_moe onto the qwen2_moe pattern):
gate_proj + up_proj -> gate_up_proj at rank 2r, down_proj -> down_proj, gate -> the router, and "all-linear"
adds them all. Checked against the meta device and get_peft_model by tests/estimate/test_moe_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.estimate.families import LinearGroup, llama, mixtral, qwen2, qwen3
from vramplan.estimate.families.mixtral import MoeFields
from vramplan.estimate.families.qwen2_moe import (  # noqa: F401 (the MoE hooks, shared with Qwen2-MoE)
    active_intermediate_size,
    active_matmul_params,
    attention_flops_per_token,
    chat_template,
    checkpointed_bytes_per_token,
    dispatch_bytes_per_token,
    final_norm_bytes_per_token,
    kv_bytes_per_token,
    largest_tensor_params,
    prefill_bytes_per_token,
    unread_params,
)
from vramplan.estimate.families.qwen3 import Qwen3Spec

ROLE = "text"
HF_MODEL_TYPES = ("qwen3_moe",)
PROFILE_FIELDS = {**qwen3.PROFILE_FIELDS, **mixtral.MOE_PROFILE_FIELDS}
# transformers' Qwen3MoeConfig defaults (configuration_qwen3_moe.py; no head_dim key: hidden // heads)
HF_DEFAULTS = {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_attention_heads": 32,
               "num_key_value_heads": 4, "vocab_size": 151936, "max_position_embeddings": 32768}
MOE_DEFAULTS = {"num_experts": 128, "k": 8, "moe": 768, "norm": False}
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Qwen3MoeSpec(MoeFields, Qwen3Spec):
    """A Qwen3-MoE decoder's config."""

    family: ClassVar[str] = "qwen3_moe"


SPEC = Qwen3MoeSpec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> Qwen3MoeSpec:
    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS)
    fields.update(mlp_bias=False)
    layers = fields["num_layers"]
    return Qwen3MoeSpec(**fields, **qwen2.window_fields(cfg, where, prefix, layers),
                        **mixtral.moe_fields(cfg, where, prefix, layers, "num_experts", MOE_DEFAULTS))


def linear_groups(t: Qwen3MoeSpec) -> list[LinearGroup]:
    return mixtral.moe_linear_groups(t, mixtral.attention_groups(t), EXPERT_NAMES)


def other_params(t: Qwen3MoeSpec) -> dict[str, int]:
    return mixtral.moe_other_params(t, qwen3.other_params(t))


def layer_params(t: Qwen3MoeSpec) -> int:
    return mixtral.moe_layer_params(t, mixtral.attention_groups(t), 2 * t.hidden_size + 2 * t.d_head)


def parameter_lora_params(t: Qwen3MoeSpec, lora) -> int:
    return mixtral.parameter_lora_params(t, lora, EXPERT_NAMES)


def saved_bytes_per_layer(t: Qwen3MoeSpec, lora, compute_bytes: int = 2) -> int:
    return mixtral.saved_bytes_per_layer(t, lora, compute_bytes, EXPERT_NAMES)


def saved_bytes_per_token(t: Qwen3MoeSpec, mode: str, lora, attn: str, seq: int, compute_bytes: int = 2,
                          kbit_saves_inputs: bool = False, residual_bytes: int = 0,
                          adapter_casts: bool = False) -> float:
    names = ATTENTION + (("gate_proj", "up_proj", "down_proj") if t.dense_layers else ()) + (
        () if t.fused_experts else (*EXPERT_NAMES, "gate"))
    return mixtral.moe_saved_bytes_per_token(t, qwen3.saved_bytes_per_token, mode, lora, attn, seq, compute_bytes,
                                             kbit_saves_inputs, residual_bytes, adapter_casts, 2, names,
                                             EXPERT_NAMES)


kv_cache_tokens = qwen2.kv_cache_tokens
window_mask_bytes_per_token = qwen2.window_mask_bytes_per_token
