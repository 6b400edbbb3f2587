"""Qwen3 dense decoders: Qwen2's layout with RMSNorms on the per-head queries and keys, and no fixed q/k/v bias.

transformers models/qwen3/modeling_qwen3.py: q/k/v/o with bias=`attention_bias` (default False), q_norm and
k_norm = RMSNorm(head_dim) per layer (one weight of head_dim each, shared by all heads), `head_dim` a config key
(default 128, not hidden_size // heads), tied embeddings when `tie_word_embeddings` (Qwen3 0.6B-4B), sliding
window as Qwen2's (families/qwen2.py). Exact counts are checked on the meta device by
tests/estimate/test_families.py.

Activations: Llama's (families/llama.py) plus the two head norms (Qwen3RMSNorm: fp32 upcast, x * rsqrt(mean(x^2)),
cast back, times the weight). Per token, q_norm saves its fp32 input 4q and a fp32 rstd per head 4a, and the
normalised bf16 2q only when its weight is trainable (full fine-tuning); k_norm the same on kv and the kv heads.
RoPE after the norms saves only cos/sin. Pinned by tests/estimate/test_families.py against saved_tensors_hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.estimate.families import llama, qwen2
from vramplan.estimate.families.qwen2 import Qwen2Spec, kv_cache_tokens, window_fields  # noqa: F401 (hook)

ROLE = "text"
HF_MODEL_TYPES = ("qwen3",)
PROFILE_FIELDS = {**llama.PROFILE_FIELDS, "sliding_window": (int, False, 0), "sliding_layers": (int, False, 0)}
# transformers' Qwen3Config defaults (configuration_qwen3.py)
HF_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
               "vocab_size": 151936, "max_position_embeddings": 32768, "head_dim": 128}


@dataclass(frozen=True)
class Qwen3Spec(Qwen2Spec):
    """A Qwen3 decoder's config (attention_bias applies to q/k/v/o; mlp_bias unused)."""

    family: ClassVar[str] = "qwen3"


SPEC = Qwen3Spec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> Qwen3Spec:
    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS)
    fields.update(mlp_bias=False)  # modeling_qwen3.py Qwen3MLP: bias=False
    return Qwen3Spec(**fields, **window_fields(cfg, where, prefix, fields["num_layers"]))


def other_params(t: Qwen3Spec) -> dict[str, int]:
    out = llama.other_params(t)
    out["norms"] += 2 * t.d_head * t.num_layers  # q_norm and k_norm
    return out


def layer_params(t: Qwen3Spec) -> int:
    return llama.layer_params(t) + 2 * t.d_head


def saved_bytes_per_token(t: Qwen3Spec, mode: str, lora, attn: str, seq: int, compute_bytes: int = 2,
                          kbit_saves_inputs: bool = False, residual_bytes: int = 0,
                          adapter_casts: bool = False) -> float:
    q, kv, a, akv = t.q_dim, t.kv_dim, t.num_attention_heads, t.num_key_value_heads
    per = (6 if mode == "full" else 4) * (q + kv) + 4 * (a + akv)
    if compute_bytes != 2:
        per = per * compute_bytes / 2
    return llama.saved_bytes_per_token(t, mode, lora, attn, seq, compute_bytes, kbit_saves_inputs,
                                       residual_bytes, adapter_casts) + per


chat_template = llama.chat_template
linear_groups = llama.linear_groups
largest_tensor_params = llama.largest_tensor_params
checkpointed_bytes_per_token = llama.checkpointed_bytes_per_token
final_norm_bytes_per_token = llama.final_norm_bytes_per_token
attention_flops_per_token = llama.attention_flops_per_token
kv_bytes_per_token = llama.kv_bytes_per_token
prefill_bytes_per_token = llama.prefill_bytes_per_token
window_mask_bytes_per_token = qwen2.window_mask_bytes_per_token
