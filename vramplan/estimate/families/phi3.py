"""Phi-3 / Phi-3.5 / Phi-4 decoders (model_type "phi3"; Phi-4 and Phi-4-mini use it too): Llama's layer with the
attention's q, k, v and the MLP's gate and up fused into one Linear each.

transformers models/phi3/modeling_phi3.py: qkv_proj = Linear(h, q + 2kv), o_proj, gate_up_proj = Linear(h, 2i),
down_proj, all bias-free; two RMSNorms (Llama's) per layer, the final norm; lm_head tied only when
`tie_word_embeddings` (Phi-4-mini). PEFT's LoRA targets are therefore qkv_proj, o_proj, gate_up_proj, down_proj:
one adapter on the fused qkv_proj where Llama has three. `partial_rotary_factor` (Phi-4-mini) changes no
parameter. Exact counts are checked on the meta device by tests/estimate/test_families_gemma_phi.py.

Activations are Llama's (families/llama.py), op by op: the fused outputs are sliced into views (qkv[..., :q];
gate_up.chunk(2)), so the SwiGLU keeps the whole 2i gate_up output where Llama keeps gate and up (2i + 2i), and
the attention keeps the RoPE'd q and k and v as Llama does. LoRA adds Llama's adapter terms for four adapted
Linears (2r each, and 3*d_in with dropout; without dropout the inputs they share). Pinned by the same test
against saved_tensors_hooks (2%). One CPU-only difference, not modelled: SDPA's CPU kernel returns its output in
the query's layout, which for a slice of qkv is (b, heads, s, d), so o_proj's `transpose(1, 2).contiguous()`
copies it (2q more when o_proj keeps its input); CUDA's flash and memory-efficient kernels allocate the output
as (b, s, heads, d) (torch aten/src/ATen/native/transformers/cuda/attention.cu), where the transpose is free.

Sliding window (configuration_phi3.py `sliding_window`, e.g. 2047 in Phi-3-mini-4k, null in Phi-4): every layer
masks to the window, and transformers' cache keeps min(context, W) tokens per layer (families/mistral.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from vramplan.estimate.families import LinearGroup, llama, mistral, targeted
from vramplan.estimate.families.mistral import MistralSpec, read_window

ROLE = "text"
HF_MODEL_TYPES = ("phi3",)
PROFILE_FIELDS = {**llama.PROFILE_FIELDS, "sliding_window": (int, False, 0)}
# transformers' Phi3Config defaults (configuration_phi3.py)
HF_DEFAULTS = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
               "vocab_size": 32064, "max_position_embeddings": 4096}
FUSED = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}  # a fused Linear -> the Llama Linear whose input it reads


@dataclass(frozen=True)
class Phi3Spec(MistralSpec):
    """A Phi-3 decoder's config: Mistral's (Llama's fields, biases always off, an attention window)."""

    family: ClassVar[str] = "phi3"


SPEC = Phi3Spec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> Phi3Spec:
    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS)
    fields.update(attention_bias=False, mlp_bias=False)  # modeling_phi3.py: bias=False on every Linear
    return Phi3Spec(**fields, sliding_window=read_window(cfg, where, prefix, None))


def chat_template(t: Phi3Spec) -> str:
    """Phi's <|user|>/<|assistant|> (Phi-4: <|im_start|>) format is neither of vramplan's templates
    (contract.py TEMPLATES): the generic vicuna_v1, not llama3 whatever the vocabulary size."""
    return "vicuna_v1"


# --- parameters ------------------------------------------------------------------------------------------
def linear_groups(t: Phi3Spec) -> list[LinearGroup]:
    h, i, q, kv, L = t.hidden_size, t.intermediate_size, t.q_dim, t.kv_dim, t.num_layers
    return [LinearGroup("llm", "qkv_proj", h, q + 2 * kv, False, L), LinearGroup("llm", "o_proj", q, h, False, L),
            LinearGroup("llm", "gate_up_proj", h, 2 * i, False, L), LinearGroup("llm", "down_proj", i, h, False, L)]


def layer_params(t: Phi3Spec) -> int:
    return sum(g.params for g in linear_groups(t)) // t.num_layers + 2 * t.hidden_size


def largest_tensor_params(t: Phi3Spec) -> int:
    return max([t.vocab_size * t.hidden_size] + [g.d_in * g.d_out for g in linear_groups(t)])


# --- activations (bytes per token) -----------------------------------------------------------------------
def saved_bytes_per_token(t: Phi3Spec, mode: str, lora, attn: str, seq: int, compute_bytes: int = 2,
                          kbit_saves_inputs: bool = False, residual_bytes: int = 0,
                          adapter_casts: bool = False) -> float:
    """Llama's coefficients (families/llama.py saved_bytes_per_token, same arguments) with Phi-3's adapters."""
    base = "frozen" if mode == "lora" else mode
    b = llama.saved_bytes_per_token(t, base, None, attn, seq, 2, False, residual_bytes, adapter_casts)
    as_llama = _as_llama(lora)
    if mode == "lora":
        b += _lora_bytes_per_token(t, lora, adapter_casts, as_llama)
    if kbit_saves_inputs and mode != "full":
        b += llama.kbit_input_bytes_per_token(t, as_llama, attn, residual_bytes if residual_bytes > 2 else 0)
    return b * (compute_bytes / 2) if compute_bytes != 2 else b


def _as_llama(lora):
    """The same adapters named as Llama's Linears whose inputs they read (for the input-sharing rules)."""
    if lora is None:
        return None
    return replace(lora, targets=tuple(FUSED.get(x, x) for x in lora.targets))


def _lora_bytes_per_token(t: Phi3Spec, lora, adapter_casts: bool, as_llama) -> int:
    """families/llama.py _lora_bytes_per_token over Phi-3's four Linears."""
    if lora is None:
        return 0
    adapted = [g for g in linear_groups(t) if targeted(g, lora.targets)]
    per = 2 * lora.r * len(adapted)
    if lora.dropout > 0:
        return per + 3 * sum(g.d_in for g in adapted)
    if adapter_casts:
        return per + 2 * sum(g.d_in for g in adapted)
    llama_adapted = llama._adapted(t, as_llama)  # the shared inputs: Llama's rule on the mapped names
    return per + llama._lora_bytes_per_token(t, as_llama) - 2 * lora.r * len(llama_adapted)


kv_cache_tokens = mistral.kv_cache_tokens  # the window caps every layer
window_mask_bytes_per_token = mistral.window_mask_bytes_per_token  # every layer's SDPA mask
other_params = llama.other_params
checkpointed_bytes_per_token = llama.checkpointed_bytes_per_token
final_norm_bytes_per_token = llama.final_norm_bytes_per_token
attention_flops_per_token = llama.attention_flops_per_token
kv_bytes_per_token = llama.kv_bytes_per_token
prefill_bytes_per_token = llama.prefill_bytes_per_token
