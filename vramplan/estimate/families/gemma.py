"""Gemma decoders: Gemma (model_type "gemma"), Gemma 2 ("gemma2") and Gemma 3's text model ("gemma3_text").

transformers models/gemma/modeling_gemma.py, models/gemma2/modeling_gemma2.py, models/gemma3/modeling_gemma3.py
share Llama's Linear names and shapes (q/k/v/o with bias=`attention_bias`, gate/up/down bias-free) with:
  * `head_dim` a config key (default 256), not hidden_size // heads;
  * a GeGLU MLP: down(gelu_tanh(gate(x)) * up(x));
  * RMSNorms that compute in fp32 and scale by (1 + w): `(norm(x.float()) * (1.0 + w.float())).type_as(x)`;
  * the embeddings scaled by sqrt(hidden_size) (a buffer, not a parameter); lm_head tied by default;
  * Gemma 2 and 3: four norms per layer (post-attention, pre- and post-feed-forward beside the input norm), and
    sliding-window attention on the layers `layer_types` marks "sliding_attention" (Gemma 2: every other layer,
    from the first; Gemma 3: five of every six, `sliding_window_pattern`);
  * Gemma 2: tanh soft-capping of the attention logits (`attn_logit_softcapping`) and of the final logits
    (`final_logit_softcapping`); Gemma 3: RMSNorm(head_dim) on the queries and keys (q_norm, k_norm) instead of
    the attention soft-cap, and a local RoPE base (no parameters).
Exact counts are checked on the meta device by tests/estimate/test_families_gemma_phi.py.

Activations, bytes saved for backward per token per layer with 16-bit weights (op by op; pinned by the same test
against saved_tensors_hooks, 2% tolerance):
  * each norm of width w keeps its fp32 input (4w) and the fp32 rstd (4 per row), plus its fp32 normalised
    value (4w) when its weight is trainable (the (1 + w) product needs it for the weight's gradient; Llama's
    norm keeps a 16-bit one, families/llama.py). Full fine-tuning: the input and pre-feed-forward norms'
    outputs (2h each) are kept by the Linears that read them;
  * SDPA (Gemma, Gemma 3) and FlashAttention-2: q, k, v and the output (4q + 4kv) and an fp32 logsumexp (4a),
    as Llama. Gemma 2 has no SDPA path (modeling_gemma2.py `_supports_sdpa = False`: SDPA cannot soft-cap), so
    "sdpa" means eager there: q, the GQA-repeated k and v (2q each), the o_proj input copy when o_proj is
    trainable (2q), and per score the tanh output (2 B, with the soft-cap), the fp32 softmax (4 B) and its
    16-bit cast (2 B);
  * q_norm/k_norm (Gemma 3): 4q + 4a and 4kv + 4kv-heads, plus 4q + 4kv when trainable;
  * the GeGLU: gate (read by gelu), gelu's output and up, 6i, plus their product 2i when down_proj is trainable;
  * LoRA: Llama's adapter terms (families/llama.py _lora_bytes_per_token), plus o_proj's input under eager
    attention when lora_A keeps it (no dropout).
Under SDPA, a sliding layer whose window the sequence reaches keeps the additive mask (2 B per query-key pair) and
k, v repeated to every query head (families/mistral.py window_mask_bytes_per_token; Gemma 2 runs eager: none).
Not counted (as for Llama): each norm's (1 + w) fp32 constant (4w per layer, not per token).

The final soft-cap (Gemma 2) runs on the 16-bit logits before the loss (modeling_gemma2.py
Gemma2ForCausalLM.forward: logits / cap, tanh, * cap): tanh keeps its output for backward, so both loss peaks
hold one more 16-bit copy of the logits (loss_extra_bytes_per_logit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require
from vramplan.estimate.families import llama, mistral
from vramplan.estimate.families.llama import TextSpec

ROLE = "text"
HF_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
PROFILE_FIELDS = {**llama.PROFILE_FIELDS, "sandwich_norms": (bool, False, None), "qk_norm": (bool, False, None),
                  "attn_softcap": (bool, False, None), "final_softcap": (bool, False, None),
                  "sliding_window": (int, False, 0), "sliding_layers": (int, False, 0)}
# transformers' GemmaConfig / Gemma2Config / Gemma3TextConfig defaults (configuration_gemma*.py)
_COMMON = {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
           "max_position_embeddings": 8192, "tie_word_embeddings": True}
HF_DEFAULTS = {
    "gemma": {**_COMMON, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 16},
    "gemma2": {**_COMMON, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26},
    "gemma3_text": {**_COMMON, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "vocab_size": 262208, "max_position_embeddings": 131072},
}
# (default window, sliding layer every `pattern`: layer i slides unless (i + 1) % pattern == 0), per config class
WINDOWS = {"gemma": None, "gemma2": (4096, 2), "gemma3_text": (4096, 6)}
SOFTCAPS = {"gemma": (None, None), "gemma2": (50.0, 30.0), "gemma3_text": (None, None)}  # (attention, final)


@dataclass(frozen=True)
class GemmaSpec(TextSpec):
    """A Gemma decoder's config: Llama's fields (mlp_bias unused) and the Gemma generation's layout switches."""

    family: ClassVar[str] = "gemma"
    sandwich_norms: bool = False  # four norms per layer (Gemma 2, 3)
    qk_norm: bool = False  # RMSNorm(head_dim) on queries and keys (Gemma 3)
    attn_softcap: bool = False  # soft-capped attention logits: eager attention (Gemma 2)
    final_softcap: bool = False  # soft-capped final logits (Gemma 2)
    sliding_window: int = 0  # 0: full attention everywhere
    sliding_layers: int = 0  # how many layers use the window


SPEC = GemmaSpec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> GemmaSpec:
    mt = cfg.get("model_type", "gemma")
    mt = mt if mt in HF_DEFAULTS else "gemma"
    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS[mt])
    fields.update(mlp_bias=False)  # GemmaMLP: bias=False

    def cap(key, default):
        v = require(cfg, key, float, where, label=prefix + key, allow_none=True, default=default)
        return bool(v) if key in cfg else default is not None

    attn_cap, final_cap = SOFTCAPS[mt]
    return GemmaSpec(**fields, sandwich_norms=mt != "gemma", qk_norm=mt == "gemma3_text",
                     attn_softcap=cap("attn_logit_softcapping", attn_cap),
                     final_softcap=cap("final_logit_softcapping", final_cap),
                     **_window(cfg, where, prefix, mt, fields["num_layers"]))


def _window(cfg: dict, where: str, prefix: str, mt: str, layers: int) -> dict:
    """sliding_window and sliding_layers as Gemma2Config/Gemma3TextConfig derive them (layer_types, or the
    pattern); Gemma 1 has none."""
    if WINDOWS[mt] is None:
        return {"sliding_window": 0, "sliding_layers": 0}
    default, pattern = WINDOWS[mt]
    window = require(cfg, "sliding_window", int, where, label=prefix + "sliding_window", min=1, allow_none=True,
                     default=default) or 0  # null: full attention
    types = require(cfg, "layer_types", list, where, label=prefix + "layer_types", allow_none=True, default=None)
    if types is not None:
        if len(types) != layers or not all(isinstance(x, str) for x in types):
            raise ContractError(f"{where}: {prefix}layer_types: must list one string per layer ({layers})")
        n = sum(x == "sliding_attention" for x in types)
    else:
        if mt == "gemma3_text":
            pattern = require(cfg, "sliding_window_pattern", int, where, label=prefix + "sliding_window_pattern",
                              min=1, allow_none=True, default=None) or pattern
        n = sum(bool((i + 1) % pattern) for i in range(layers))
    return {"sliding_window": window if n else 0, "sliding_layers": n if window else 0}


def chat_template(t: GemmaSpec) -> str:
    """Gemma's <start_of_turn> format is neither of vramplan's templates (contract.py TEMPLATES): the generic
    vicuna_v1 (USER:/ASSISTANT:), whose token counts are close; not llama3, whatever the vocabulary size."""
    return "vicuna_v1"


# --- parameters ------------------------------------------------------------------------------------------
def _norms_per_layer(t: GemmaSpec) -> int:
    return 4 if t.sandwich_norms else 2


def other_params(t: GemmaSpec) -> dict[str, int]:
    """embed_tokens, lm_head (0 when tied) and every RMSNorm weight: the layers', q_norm/k_norm, the final norm."""
    out = llama.other_params(t)
    out["norms"] = (_norms_per_layer(t) * t.num_layers + 1) * t.hidden_size + _head_norms(t) * t.num_layers
    return out


def _head_norms(t: GemmaSpec) -> int:
    return 2 * t.d_head if t.qk_norm else 0


def layer_params(t: GemmaSpec) -> int:
    return (sum(g.params for g in linear_groups(t)) // t.num_layers + _norms_per_layer(t) * t.hidden_size
            + _head_norms(t))


# --- activations (bytes per token) -----------------------------------------------------------------------
def saved_bytes_per_token(t: GemmaSpec, mode: str, lora, attn: str, seq: int, compute_bytes: int = 2,
                          kbit_saves_inputs: bool = False, residual_bytes: int = 0,
                          adapter_casts: bool = False) -> float:
    """Saved-for-backward bytes per token of one decoder layer without checkpointing (module text); the
    arguments are families/llama.py saved_bytes_per_token's."""
    if mode not in ("full", "lora", "frozen"):
        raise ValueError(mode)
    h, q, kv, i, a, akv = (t.hidden_size, t.q_dim, t.kv_dim, t.intermediate_size, t.num_attention_heads,
                           t.num_key_value_heads)
    full = mode == "full"
    rb = residual_bytes if residual_bytes > compute_bytes else 0
    b = _norms_per_layer(t) * ((8 if full else 4) * h + 4) + (4 * h if full else 0)
    if t.qk_norm:
        b += 4 * (q + kv) + 4 * (a + akv) + (4 * (q + kv) if full else 0)
    eager = attn == "eager" or (t.attn_softcap and attn == "sdpa")
    o_kept = full or (mode == "lora" and _o_adapted_without_dropout(t, lora))
    if eager:
        b += 6 * q + (2 * q if o_kept else 0) + a * seq * (6 + (2 if t.attn_softcap else 0))
    else:
        b += 4 * q + 4 * kv + 4 * a
    b += (3 * rb * i if rb else 6 * i) + (2 * i if full else 0)
    if mode == "lora":
        b += llama._lora_bytes_per_token(t, lora, adapter_casts)
    if kbit_saves_inputs and not full:
        b += llama.kbit_input_bytes_per_token(t, lora, "eager" if eager else attn, rb)
    return b * (compute_bytes / 2) if compute_bytes != 2 else b


def window_mask_bytes_per_token(t: GemmaSpec, attn: str, seq: int, compute_bytes: int = 2) -> tuple[int, float]:
    """The sliding layers' SDPA mask and repeated k/v (families/mistral.py window_mask_bytes_per_token); none for
    Gemma 2, whose "sdpa" is eager (soft-capped scores)."""
    return (0, 0.0) if t.attn_softcap else mistral.window_mask_bytes_per_token(t, attn, seq, compute_bytes)


def _o_adapted_without_dropout(t: GemmaSpec, lora) -> bool:
    return lora is not None and lora.dropout == 0 and any(g.name == "o_proj" for g in llama._adapted(t, lora))


def loss_extra_bytes_per_logit(t: GemmaSpec, compute_bytes: int) -> int:
    """The final soft-cap's tanh output, kept for backward through both loss peaks (module text)."""
    return compute_bytes if t.final_softcap else 0


# --- FLOPs and inference -----------------------------------------------------------------------------------
def kv_cache_tokens(t: GemmaSpec, context: int) -> float:
    """Mean tokens per layer in the KV cache: full layers hold the context, sliding ones the window."""
    from vramplan.estimate.families.qwen2 import kv_cache_tokens as mixed

    return mixed(t, context)


linear_groups = llama.linear_groups  # q/k/v/o bias = attention_bias; mlp_bias is False
largest_tensor_params = llama.largest_tensor_params
checkpointed_bytes_per_token = llama.checkpointed_bytes_per_token
final_norm_bytes_per_token = llama.final_norm_bytes_per_token
attention_flops_per_token = llama.attention_flops_per_token  # the window's saving is not counted (conservative)
kv_bytes_per_token = llama.kv_bytes_per_token
prefill_bytes_per_token = llama.prefill_bytes_per_token
