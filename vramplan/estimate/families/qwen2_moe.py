"""Qwen-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention with a sparse MoE MLP and a shared expert.

transformers models/qwen2_moe/modeling_qwen2_moe.py: q/k/v with bias=`qkv_bias` (default True), o without; each
sparse layer's Qwen2MoeSparseMoeBlock has a router (Qwen2MoeTopKRouter, an E x h parameter), fused experts of
width `moe_intermediate_size` (Qwen2MoeExperts: gate_up_proj, down_proj, the grouped_mm path), and an always-on
shared expert (Qwen2MoeMLP of `shared_expert_intermediate_size`: gate_proj/up_proj/down_proj nn.Linear) scaled
by sigmoid(shared_expert_gate(x)), an nn.Linear h -> 1. Layers in `mlp_only_layers` or off the
`decoder_sparse_step` are dense Qwen2MoeMLP of `intermediate_size`.

The MoE accounting is Mixtral's (families/mixtral.py: resident experts, routed FLOPs, activations), with the
routing weights cast to the 16-bit compute dtype (2 B per copy) and the top-k renormalised only with
`norm_topk_prob`. PEFT 0.21 has no v4-name mapping for qwen2_moe (peft utils/transformers_weight_conversion.py
maps mixtral and the models transformers converts like qwen2_moe, not qwen2_moe itself): `all-linear` and
gate_proj/up_proj/down_proj adapt the attention, the shared expert and its gate only, never the routed
experts. Checked against get_peft_model by tests/estimate/test_moe_families.py, with the exact counts.
The sliding window follows Qwen2's reading (families/qwen2.py window_fields: config.json's layer_types).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.estimate.families import LinearGroup, llama, mixtral, qwen2
from vramplan.estimate.families.mixtral import MoeFields
from vramplan.estimate.families.qwen2 import Qwen2Spec

ROLE = "text"
HF_MODEL_TYPES = ("qwen2_moe",)
PROFILE_FIELDS = {**qwen2.PROFILE_FIELDS, **mixtral.MOE_PROFILE_FIELDS}
# transformers' Qwen2MoeConfig defaults (configuration_qwen2_moe.py)
HF_DEFAULTS = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
               "vocab_size": 151936, "max_position_embeddings": 32768}
MOE_DEFAULTS = {"num_experts": 60, "k": 4, "moe": 1408, "shared": 5632, "norm": False}
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")  # transformers 4.x: mlp.experts.N.gate_proj, ...
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Qwen2MoeSpec(MoeFields, Qwen2Spec):
    """A Qwen2-MoE decoder's config (attention_bias: the q/k/v bias, `qkv_bias`)."""

    family: ClassVar[str] = "qwen2_moe"


SPEC = Qwen2MoeSpec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> Qwen2MoeSpec:
    from vramplan.contract import require

    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS)
    bias = require(cfg, "qkv_bias", bool, where, label=prefix + "qkv_bias", allow_none=True, default=None)
    fields.update(attention_bias=True if bias is None else bias, mlp_bias=False)
    layers = fields["num_layers"]
    return Qwen2MoeSpec(**fields, **qwen2.window_fields(cfg, where, prefix, layers),
                        **mixtral.moe_fields(cfg, where, prefix, layers, "num_experts", MOE_DEFAULTS))


def attention_groups(t: Qwen2MoeSpec) -> list[LinearGroup]:
    h, q, kv, L, b = t.hidden_size, t.q_dim, t.kv_dim, t.num_layers, t.attention_bias
    return [LinearGroup("llm", "q_proj", h, q, b, L), LinearGroup("llm", "k_proj", h, kv, b, L),
            LinearGroup("llm", "v_proj", h, kv, b, L), LinearGroup("llm", "o_proj", q, h, False, L)]


def linear_groups(t: Qwen2MoeSpec) -> list[LinearGroup]:
    return mixtral.moe_linear_groups(t, attention_groups(t), EXPERT_NAMES)


def other_params(t: Qwen2MoeSpec) -> dict[str, int]:
    return mixtral.moe_other_params(t, llama.other_params(t))


def layer_params(t: Qwen2MoeSpec) -> int:
    return mixtral.moe_layer_params(t, attention_groups(t), 2 * t.hidden_size)


def parameter_lora_params(t: Qwen2MoeSpec, lora) -> int:
    """None: PEFT maps no target name onto qwen2_moe's fused experts or router (module text)."""
    return 0


def saved_bytes_per_token(t: Qwen2MoeSpec, mode: str, lora, attn: str, seq: int, compute_bytes: int = 2,
                          kbit_saves_inputs: bool = False, residual_bytes: int = 0,
                          adapter_casts: bool = False) -> float:
    names = LINEAR_NAMES + (() if t.fused_experts else ("gate",))
    return mixtral.moe_saved_bytes_per_token(t, llama.saved_bytes_per_token, mode, lora, attn, seq, compute_bytes,
                                             kbit_saves_inputs, residual_bytes, adapter_casts, 2, names, ())


def saved_bytes_per_layer(t: Qwen2MoeSpec, lora, compute_bytes: int = 2) -> int:
    return 0  # no adapter on a fused parameter (parameter_lora_params)


def dispatch_bytes_per_token(t: Qwen2MoeSpec) -> float:
    return mixtral.dispatch_bytes_per_token(t, 2)  # routing weights in the compute dtype


kv_cache_tokens = qwen2.kv_cache_tokens
window_mask_bytes_per_token = qwen2.window_mask_bytes_per_token
chat_template = llama.chat_template
largest_tensor_params = mixtral.largest_tensor_params
checkpointed_bytes_per_token = mixtral.checkpointed_bytes_per_token
final_norm_bytes_per_token = llama.final_norm_bytes_per_token
attention_flops_per_token = llama.attention_flops_per_token
kv_bytes_per_token = llama.kv_bytes_per_token
prefill_bytes_per_token = mixtral.prefill_bytes_per_token
active_matmul_params = mixtral.active_matmul_params
unread_params = mixtral.unread_params
active_intermediate_size = mixtral.active_intermediate_size
