"""Qwen2 / Qwen2.5 decoders: Llama's layer anatomy with biases on q, k and v (not o), optional tied embeddings,
and an optional sliding window on the upper layers.

transformers models/qwen2/modeling_qwen2.py: q_proj, k_proj, v_proj with bias=True, o_proj and the MLP without;
two RMSNorms per layer, the final norm; lm_head tied to embed_tokens when `tie_word_embeddings` (Qwen2.5 0.5B-3B).
Everything else (activations, FLOPs) is Llama's (families/llama.py): a Linear bias adds parameters but no saved
activations. Exact counts are checked on the meta device by tests/estimate/test_families.py.

Sliding window (configuration_qwen2.py): only with `use_sliding_window`, on layers i >= `max_window_layers`
(or the layers `layer_types` marks "sliding_attention"); those layers' KV cache holds min(context, W) tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require
from vramplan.estimate.families import LinearGroup, llama
from vramplan.estimate.families.llama import TextSpec
from vramplan.estimate.families.mistral import read_window, window_mask_bytes_per_token  # noqa: F401 (hook)

ROLE = "text"
HF_MODEL_TYPES = ("qwen2",)
PROFILE_FIELDS = {**llama.PROFILE_FIELDS, "sliding_window": (int, False, 0), "sliding_layers": (int, False, 0)}
# transformers' Qwen2Config defaults (configuration_qwen2.py)
HF_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
               "vocab_size": 151936, "max_position_embeddings": 32768}
DEFAULT_WINDOW, DEFAULT_MAX_WINDOW_LAYERS = 4096, 28


@dataclass(frozen=True)
class Qwen2Spec(TextSpec):
    """A Qwen2 decoder's config: Llama's fields (attention_bias/mlp_bias unused) and its sliding layers."""

    family: ClassVar[str] = "qwen2"
    sliding_window: int = 0  # 0: full attention everywhere
    sliding_layers: int = 0  # how many layers use the window


SPEC = Qwen2Spec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> Qwen2Spec:
    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS)
    fields.update(attention_bias=False, mlp_bias=False)  # q/k/v biases are fixed in linear_groups below
    return Qwen2Spec(**fields, **window_fields(cfg, where, prefix, fields["num_layers"]))


def window_fields(cfg: dict, where: str, prefix: str, layers: int) -> dict:
    """sliding_window and sliding_layers as Qwen2Config/Qwen3Config derive them."""
    def get(key, kind, default, lo=None):
        v = require(cfg, key, kind, where, label=prefix + key, min=lo, allow_none=True, default=None)
        return default if v is None else v

    window = read_window(cfg, where, prefix, DEFAULT_WINDOW) if get("use_sliding_window", bool, False) else 0
    types = get("layer_types", list, None)
    if types is not None:
        if len(types) != layers or not all(isinstance(x, str) for x in types):
            raise ContractError(f"{where}: {prefix}layer_types: must list one string per layer ({layers})")
        n = sum(x == "sliding_attention" for x in types)
        return {"sliding_window": window if n else 0, "sliding_layers": n if window else 0}
    if not window:
        return {"sliding_window": 0, "sliding_layers": 0}
    first = get("max_window_layers", int, DEFAULT_MAX_WINDOW_LAYERS, lo=0)
    return {"sliding_window": window, "sliding_layers": max(0, layers - first)}


def kv_cache_tokens(t: Qwen2Spec, context: int) -> float:
    """Mean tokens per layer in the KV cache: full layers hold the context, sliding ones the window."""
    if not t.sliding_window:
        return context
    n = t.sliding_layers
    return ((t.num_layers - n) * context + n * min(context, t.sliding_window)) / t.num_layers


def linear_groups(t: Qwen2Spec) -> list[LinearGroup]:
    h, i, q, kv, L = t.hidden_size, t.intermediate_size, t.q_dim, t.kv_dim, t.num_layers
    return [LinearGroup("llm", "q_proj", h, q, True, L), LinearGroup("llm", "k_proj", h, kv, True, L),
            LinearGroup("llm", "v_proj", h, kv, True, L), LinearGroup("llm", "o_proj", q, h, False, L),
            LinearGroup("llm", "gate_proj", h, i, False, L), LinearGroup("llm", "up_proj", h, i, False, L),
            LinearGroup("llm", "down_proj", i, h, False, L)]


def layer_params(t: Qwen2Spec) -> int:
    return sum(g.params for g in linear_groups(t)) // t.num_layers + 2 * t.hidden_size


chat_template = llama.chat_template
largest_tensor_params = llama.largest_tensor_params  # the largest weight; biases do not change it
saved_bytes_per_token = llama.saved_bytes_per_token  # a Linear bias saves nothing for backward
other_params = llama.other_params
checkpointed_bytes_per_token = llama.checkpointed_bytes_per_token
final_norm_bytes_per_token = llama.final_norm_bytes_per_token
attention_flops_per_token = llama.attention_flops_per_token
kv_bytes_per_token = llama.kv_bytes_per_token
prefill_bytes_per_token = llama.prefill_bytes_per_token
