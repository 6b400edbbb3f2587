"""Mistral (Mistral-7B v0.1-v0.3, Mistral-Nemo, Ministral-style dense decoders): Llama's layer anatomy, no biases,
and a sliding attention window.

transformers models/mistral/modeling_mistral.py: the same module tree as LlamaForCausalLM (q/k/v/o, gate/up/down,
two RMSNorms per layer, final norm, lm_head), with every Linear bias-free regardless of config keys, and
`head_dim` defaulting to hidden_size // num_attention_heads (configuration_mistral.py). Parameters, activations
and FLOPs are therefore Llama's (families/llama.py); exact counts are checked on the meta device by
tests/estimate/test_families.py.

What differs is the KV cache at inference: with `sliding_window` W set (MistralConfig's default 4096 when the
key is absent; null in Mistral-7B v0.2+ configs means full attention), transformers' cache keeps the last
W - 1 tokens per layer (cache_utils.py DynamicSlidingWindowLayer), so a layer holds min(context, W) tokens.

In training, a window the sequence reaches costs SDPA an explicit mask (window_mask_bytes_per_token; shared with
every family that has a window: Qwen2/3, Phi-3, Mixtral, Qwen-MoE, Gemma 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import require
from vramplan.estimate.families import llama
from vramplan.estimate.families.llama import TextSpec

ROLE = "text"
HF_MODEL_TYPES = ("mistral",)
PROFILE_FIELDS = {**llama.PROFILE_FIELDS, "sliding_window": (int, False, 0)}
# transformers' MistralConfig defaults (configuration_mistral.py), for keys a config.json may omit
HF_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096 * 32}
DEFAULT_WINDOW = 4096


@dataclass(frozen=True)
class MistralSpec(TextSpec):
    """A Mistral decoder's config: Llama's fields (biases always off) and its attention window."""

    family: ClassVar[str] = "mistral"
    sliding_window: int = 0  # 0: full attention


SPEC = MistralSpec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> MistralSpec:
    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS)
    fields.update(attention_bias=False, mlp_bias=False)  # modeling_mistral.py: bias=False on every Linear
    return MistralSpec(**fields, sliding_window=read_window(cfg, where, prefix, DEFAULT_WINDOW))


def read_window(cfg: dict, where: str, prefix: str, default: int | None) -> int:
    """`sliding_window`: absent -> the config class default, null -> 0 (full attention)."""
    if "sliding_window" not in cfg:
        return default or 0
    return require(cfg, "sliding_window", int, where, label=prefix + "sliding_window", min=1, allow_none=True,
                   default=None) or 0


def kv_cache_tokens(t: MistralSpec, context: int) -> float:
    """Tokens each layer's KV cache holds: the window caps it."""
    return min(context, t.sliding_window) if t.sliding_window else context


def window_mask_bytes_per_token(t, attn: str, seq: int, compute_bytes: int = 2) -> tuple[int, float]:
    """The sliding-window mask under SDPA: (layers that pay it, saved bytes per token in each such layer).

    transformers masking_utils.py create_sliding_window_causal_mask -> sdpa_mask materialises a boolean
    (b, 1, s, s) mask once `s >= sliding_window` (_ignore_causal_mask_sdpa cannot hand SDPA is_causal=True then),
    and every layer of the window's type gets it. Per such layer:
      * torch's SDPA turns it into an additive mask of the query dtype (aten attention.cpp
        convert_boolean_attn_mask), a fresh (b, 1, s, s) tensor per call that the kernel keeps for backward (CPU:
        _scaled_dot_product_flash_attention_for_cpu; CUDA: flash takes no mask, so the memory-efficient kernel,
        which keeps it as attn_bias, is assumed): compute bytes per query-key pair, `compute_bytes * s` per token;
      * integrations/sdpa_attention.py use_gqa_in_sdpa refuses enable_gqa with a mask (CPU, CUDA), so repeat_kv
        copies k and v to every query head and SDPA keeps the copies: `2 * compute_bytes * (q - kv)` per token
        (repeated_kv_bytes_per_token: nothing with one kv head, where the expand-and-reshape stays a view).
    Nothing under eager (one additive mask for all layers, added to the scores by an op that keeps nothing; the
    scores are the family's per-score terms) or flash (the window is the kernel's own). Full-attention layers
    without padding keep is_causal=True and no mask (a right-padded micro-batch gives every layer the same mask
    and cost: not counted, docs/estimate.md#activations). Pinned at two lengths by
    tests/estimate/test_window_mask.py."""
    window = getattr(t, "sliding_window", 0)
    if attn != "sdpa" or not window or seq < window:
        return 0, 0.0
    layers = getattr(t, "sliding_layers", t.num_layers)  # Mistral, Phi-3, Mixtral: every layer
    return layers, compute_bytes * seq + repeated_kv_bytes_per_token(t, compute_bytes)


def repeated_kv_bytes_per_token(t, compute_bytes: int = 2) -> int:
    """k and v copied to every query head when SDPA gets a mask (modeling_*.py repeat_kv: expand + reshape). With
    one kv head (multi-query: Gemma-2B, Gemma 3 1B) the reshape merges a size-1 dim and stays a view: no copy
    (measured, tests/estimate/test_padding_mask.py); with one query head per kv head there is nothing to repeat."""
    return 0 if t.num_key_value_heads <= 1 else 2 * compute_bytes * (t.q_dim - t.kv_dim)


chat_template = llama.chat_template
linear_groups = llama.linear_groups
other_params = llama.other_params
layer_params = llama.layer_params
largest_tensor_params = llama.largest_tensor_params
saved_bytes_per_token = llama.saved_bytes_per_token
checkpointed_bytes_per_token = llama.checkpointed_bytes_per_token
final_norm_bytes_per_token = llama.final_norm_bytes_per_token
attention_flops_per_token = llama.attention_flops_per_token
kv_bytes_per_token = llama.kv_bytes_per_token
prefill_bytes_per_token = llama.prefill_bytes_per_token
