"""The Llama-style decoder (Llama-2/3/3.x, Vicuna): RMSNorm, SwiGLU MLP, grouped-query attention.

Parameters follow transformers' `LlamaForCausalLM` module tree (models/llama/modeling_llama.py), checked
exactly on the meta device by tests/test_params.py (docs/estimate.md#parameters). Per decoder layer:
q: h*q, k and v: h*kv each, o: q*h (+ biases if attention_bias); gate, up: h*i, down: i*h (+ biases if
mlp_bias); two RMSNorm weights of h. Plus embed_tokens V*h, the final norm h, lm_head V*h unless tied.

Activations (docs/estimate.md#activations; structure of Korthikanti et al. 2022, arXiv:2205.05198), bytes
saved for backward per token per layer with 16-bit compute and SDPA, counted op by op and pinned by
tests/estimate/test_activation_truth.py against torch.autograd.graph.saved_tensors_hooks:
  weights trainable (full fine-tune):   16h + 4q + 4kv + 8i + 4a + 8
  weights frozen, LoRA adapters:        the frozen figure below + 2r per adapted Linear (the A output)
                                        + 3*d_in per adapted Linear if lora_dropout > 0 (dropped copy + mask),
                                        else the adapters' shared inputs (see _lora_bytes_per_token)
  weights frozen, no adapters, but gradients flow to earlier modules (projector pretraining):
                                        8h + 4q + 4kv + 6i + 4a + 8
where 16h = two RMSNorms (fp32 upcast 4h + normalised 2h + output 2h each), 4q/4kv = SDPA's saved q, k, v
and output, 8i = gate, SiLU output, up and their product, 4a = SDPA's fp32 logsumexp, 8 = the norms' fp32
rstd. Eager attention also saves the softmax probabilities: a*s*(2+4) per token, minus the logsumexp.

An fp32 residual stream (`residual_bytes` 4: plain-PyTorch k-bit training, where peft's
prepare_model_for_kbit_training leaves the embeddings, norms and lm_head fp32 and autocast runs the matmuls
in 16 bit; docs/estimate.md#activations) changes three things, each seen op by op in the whole-step trace
(benchmarks/trace_step.py --engine plain):
  * the 4-bit/8-bit Linears return their output in their input's dtype (bitsandbytes nn/modules.py
    Linear4bit.forward: `.to(inp_dtype)`), and silu/mul are not autocast ops, so the SwiGLU's three saved
    tensors (gate, SiLU output, up) are fp32: 3*4i instead of 6i;
  * autocast casts each fp32 adapter's input to 16 bit afresh (activations are not cached: torch
    aten/src/ATen/autocast_mode.cpp cached_cast caches leaf tensors that require grad only), so adapters
    that read the same tensor keep separate 16-bit copies (_lora_bytes_per_token, adapter_casts: this holds
    for fp32 adapters under autocast with or without k-bit weights);
  * the norms save the fp32 residual itself where they saved its fp32 upcast (4h each either way), and the
    checkpointed layer inputs are fp32 (checkpointed_bytes_per_token).
SDPA's q, k, v and output are cast to 16 bit by autocast (scaled_dot_product_attention is on its
lower-precision list): unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require
from vramplan.estimate.families import LinearGroup

ROLE = "text"
HF_MODEL_TYPES = ("llama",)
PROFILE_FIELDS = {
    "num_layers": (int, True, 1), "hidden_size": (int, True, 1), "intermediate_size": (int, True, 1),
    "num_attention_heads": (int, True, 1), "num_key_value_heads": (int, True, 1), "vocab_size": (int, True, 1),
    "head_dim": (int, False, 0), "tie_word_embeddings": (bool, False, None), "attention_bias": (bool, False, None),
    "mlp_bias": (bool, False, None), "max_position_embeddings": (int, False, 1),
}
# transformers' LlamaConfig defaults, for keys a config.json may omit
HF_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048}
LLAMA3_VOCAB = 128000  # Llama-3's 128K tiktoken-BPE vocabulary (Vicuna/Llama-2: 32000)


@dataclass(frozen=True)
class TextSpec:
    """A Llama-family decoder's config."""

    family: ClassVar[str] = "llama"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.d_head


SPEC = TextSpec  # the family's config dataclass (profiles build it from their table)


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> TextSpec:
    """TextSpec from a `LlamaConfig`-shaped dict (config.json or LLaVA's text_config, `prefix` "text_config.").
    A key that is absent or null takes LlamaConfig's default; a wrong type or range is a ContractError
    (a ValueError) naming `where` and the key."""
    return TextSpec(**hf_fields(cfg, where, prefix, HF_DEFAULTS))


def hf_fields(cfg: dict, where: str, prefix: str, defaults: dict) -> dict:
    """The TextSpec fields of a Llama-layout config dict; `defaults` are the family's config class defaults
    (families/mistral.py and families/qwen2.py read their configs with this and their own defaults)."""

    def get(key, kind=int, lo=1, default=None):
        v = require(cfg, key, kind, where, label=prefix + key, min=lo, allow_none=True, default=None)
        return defaults.get(key, default) if v is None else v

    heads, hidden, head_dim = get("num_attention_heads"), get("hidden_size"), get("head_dim", lo=0, default=0)
    kv_heads = get("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise ContractError(f"{where}: {prefix}num_key_value_heads: {kv_heads} does not divide "
                            f"num_attention_heads {heads}")
    if not head_dim and hidden % heads:
        raise ContractError(f"{where}: {prefix}hidden_size: {hidden} is not a multiple of num_attention_heads "
                            f"{heads} (and no head_dim is given)")
    return dict(num_layers=get("num_hidden_layers"), hidden_size=hidden,
                intermediate_size=get("intermediate_size"), num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=get("vocab_size"), head_dim=head_dim,
                tie_word_embeddings=get("tie_word_embeddings", bool, None, False),
                attention_bias=get("attention_bias", bool, None, False),
                mlp_bias=get("mlp_bias", bool, None, False),
                max_position_embeddings=get("max_position_embeddings"))


def chat_template(t: TextSpec) -> str:
    """The bundled trainer's template for this LLM: Llama-3's header tokens, or Vicuna v1's USER:/ASSISTANT:."""
    return "llama3" if t.vocab_size >= LLAMA3_VOCAB else "vicuna_v1"


# --- parameters ------------------------------------------------------------------------------------------
def linear_groups(t: TextSpec) -> list[LinearGroup]:
    h, i, q, kv, L = t.hidden_size, t.intermediate_size, t.q_dim, t.kv_dim, t.num_layers
    ab, mb = t.attention_bias, t.mlp_bias
    return [LinearGroup("llm", "q_proj", h, q, ab, L), LinearGroup("llm", "k_proj", h, kv, ab, L),
            LinearGroup("llm", "v_proj", h, kv, ab, L), LinearGroup("llm", "o_proj", q, h, ab, L),
            LinearGroup("llm", "gate_proj", h, i, mb, L), LinearGroup("llm", "up_proj", h, i, mb, L),
            LinearGroup("llm", "down_proj", i, h, mb, L)]


def other_params(t: TextSpec) -> dict[str, int]:
    """embed_tokens, lm_head (0 when tied to the embeddings) and every RMSNorm weight incl. the final norm."""
    embed = t.vocab_size * t.hidden_size
    return {"embed": embed, "lm_head": 0 if t.tie_word_embeddings else embed,
            "norms": (2 * t.num_layers + 1) * t.hidden_size}


def layer_params(t: TextSpec) -> int:
    """One decoder layer: its Linear weights/biases and its 2 RMSNorms."""
    return sum(g.params for g in linear_groups(t)) // t.num_layers + 2 * t.hidden_size


def largest_tensor_params(t: TextSpec) -> int:
    """The largest single weight (DeepSpeed's `largest_layer_params`): embed_tokens for any real vocabulary."""
    return max([t.vocab_size * t.hidden_size] + [g.d_in * g.d_out for g in linear_groups(t)])


# --- activations (bytes per token) -----------------------------------------------------------------------
def saved_bytes_per_token(t: TextSpec, mode: str, lora, attn: str, seq: int, compute_bytes: int = 2,
                          kbit_saves_inputs: bool = False, residual_bytes: int = 0,
                          adapter_casts: bool = False) -> float:
    """Saved-for-backward bytes per token of one decoder layer without checkpointing.

    mode: "full" (weights trainable), "lora" (frozen + adapters), "frozen" (no adapters; gradient flows
    through to earlier modules). kbit_saves_inputs: the Linears are bitsandbytes 4-bit ones of a release
    whose MatMul4Bit keeps its input for backward (see kbit_input_bytes_per_token). residual_bytes: the
    residual stream's dtype, 0 = the compute dtype (4 with 16-bit compute: an fp32 residual under autocast,
    see the module text; frozen/lora modes only). adapter_casts: fp32 adapters under autocast, each of which
    keeps its own 16-bit copy of its input (_lora_bytes_per_token)."""
    h, q, kv, i, a = t.hidden_size, t.q_dim, t.kv_dim, t.intermediate_size, t.num_attention_heads
    rb = residual_bytes if residual_bytes > compute_bytes else 0  # 0: the 16-bit coefficients hold
    mlp = 3 * rb * i if rb else 6 * i  # gate, SiLU output, up
    if mode == "full":
        b = 16 * h + 4 * q + 4 * kv + 8 * i + 4 * a + 8
    elif mode == "lora":
        b = 8 * h + 4 * q + 4 * kv + mlp + 4 * a + 8 + _lora_bytes_per_token(t, lora, adapter_casts)
    elif mode == "frozen":
        b = 8 * h + 4 * q + 4 * kv + mlp + 4 * a + 8
    else:
        raise ValueError(mode)
    if kbit_saves_inputs and mode != "full":
        b += kbit_input_bytes_per_token(t, lora, attn, rb)
    if attn == "eager":
        # transformers eager_attention_forward: softmax in fp32 (saved, 4 B) cast to the compute dtype (saved
        # by the probs @ V matmul, 2 B) per score; no logsumexp
        b += a * seq * 6 - 4 * a
    # "sdpa" and "flash" save the same: SDPA's flash/efficient CUDA kernels and FlashAttention-2
    # (flash_attn_interface.py FlashAttnFunc: save_for_backward(q, k, v, out, softmax_lse)) keep q, k, v,
    # the output and an fp32 logsumexp per head and token
    # the coefficients are for 16-bit compute; fp32 compute doubles the 16-bit saves (approximation)
    return b * (compute_bytes / 2) if compute_bytes != 2 else b


def _lora_bytes_per_token(t: TextSpec, lora, adapter_casts: bool = False) -> int:
    """What peft's LoRA adds to a frozen layer's saves, per token (peft tuners/lora/layer.py Linear.forward:
    lora_B(lora_A(dropout(x)))): each adapted Linear's A output (2r), and the input lora_A saves:
      * lora_dropout > 0: the dropped copy (2 B) and the dropout mask (1 B bool: on CUDA aten dropout takes
        the fused native_dropout kernel, aten/src/ATen/native/Dropout.cpp) per input element, per adapter;
      * no dropout: the input itself, shared by the adapters that read it: the attention norm's output
        (2h) if q, k or v is adapted, the MLP norm's output (2h) if gate or up is, the SwiGLU product (2i)
        if down is; o_proj reads SDPA's output, which SDPA saves anyway.
    The frozen base Linear saves nothing: its weight needs no gradient. That holds for bitsandbytes 4-bit
    layers too as pinned (0.50.2 autograd/_functions.py MatMul4Bit keeps ctx.tensors = (None, B));
    releases before 0.43.2 kept the input as well (ctx.tensors = (A, B)): kbit_input_bytes_per_token.
    fp32 adapters under autocast (adapter_casts) share nothing: peft casts each adapter's input to lora_A's
    dtype (tuners/lora/layer.py Linear.forward: _cast_input_dtype, fp32) and autocast casts it back to 16 bit
    afresh per matmul, so every adapted Linear keeps its own 16-bit copy, 2*d_in (o_proj too)."""
    if lora is None:
        return 0
    adapted = _adapted(t, lora)
    per = 2 * lora.r * len(adapted)
    if lora.dropout > 0:
        return per + 3 * sum(g.d_in for g in adapted)
    if adapter_casts:
        return per + 2 * sum(g.d_in for g in adapted)
    names = {g.name for g in adapted}
    h = t.hidden_size
    return per + (2 * h if names & {"q_proj", "k_proj", "v_proj"} else 0) + (
        2 * h if names & {"gate_proj", "up_proj"} else 0) + (2 * t.intermediate_size if "down_proj" in names else 0)


def kbit_input_bytes_per_token(t: TextSpec, lora, attn: str, residual_bytes: int = 0) -> int:
    """What a bitsandbytes release whose MatMul4Bit keeps its input adds per token per layer (16-bit compute).

    Before bitsandbytes 0.43.2 MatMul4Bit.forward kept ctx.tensors = (A, B) whenever the input required grad
    (bitsandbytes autograd/_functions.py; removed by bitsandbytes PR #1270, "delete useless buffered
    activation"), though the frozen 4-bit weight needs no gradient. Every 4-bit Linear then keeps its
    input, counted once per tensor and only where nothing else already keeps it (_lora_bytes_per_token):
      * the attention norm's output (2h), read by q, k, v: kept already by lora_A when q, k or v is adapted
        without dropout (with dropout lora_A keeps the dropped copy instead);
      * the MLP norm's output (2h), read by gate and up: likewise when gate or up is adapted without dropout;
      * the SwiGLU product (2i), read by down: likewise when down is adapted without dropout;
      * o_proj's input: SDPA's output, which SDPA keeps anyway; eager attention makes it afresh
        (transpose(1, 2).contiguous() of probs @ V), 2q, unless o is adapted without dropout.
    With mode "frozen" (no adapters, gradient flowing to the projector) all of these are kept.
    With an fp32 residual (residual_bytes 4) each 4-bit Linear keeps its own 16-bit cast of its fp32 input
    (Linear4bit.forward: x.to(compute_dtype)), shared with nothing: q, k, v, gate, up (2h each) and down (2i).
    Derived from the code, not traced: the pinned bitsandbytes has no such input."""
    h, i = t.hidden_size, t.intermediate_size
    if residual_bytes > 2:
        return 10 * h + 2 * i + _eager_o_input(t, lora, attn)
    names = set() if lora is None or lora.dropout > 0 else {g.name for g in _adapted(t, lora)}
    b = 0 if names & {"q_proj", "k_proj", "v_proj"} else 2 * h
    b += 0 if names & {"gate_proj", "up_proj"} else 2 * h
    b += 0 if "down_proj" in names else 2 * i
    return b + _eager_o_input(t, lora, attn)


def _eager_o_input(t: TextSpec, lora, attn: str) -> int:
    """o_proj's input under eager attention (a fresh 16-bit tensor), unless lora_A without dropout keeps it."""
    names = set() if lora is None or lora.dropout > 0 else {g.name for g in _adapted(t, lora)}
    return 2 * t.q_dim if attn == "eager" and "o_proj" not in names else 0


def _adapted(t: TextSpec, lora) -> list:
    from vramplan.estimate.families import targeted

    return [g for g in linear_groups(t) if targeted(g, lora.targets)]


def checkpointed_bytes_per_token(t: TextSpec, compute_bytes: int) -> int:
    """Gradient checkpointing keeps each layer's input (the residual stream) only: pass the residual's
    dtype (fp32 under plain-PyTorch k-bit training, see the module text)."""
    return compute_bytes * t.hidden_size


def final_norm_bytes_per_token(t: TextSpec, compute_bytes: int) -> int:
    """The final RMSNorm: fp32 upcast + normalised output."""
    return (4 + 2 * compute_bytes) * t.hidden_size


# --- FLOPs and inference -----------------------------------------------------------------------------------
def attention_flops_per_token(t: TextSpec, seq: int) -> float:
    """Score and value GEMMs, forward, all layers: 4*s*q per layer per token, halved by the causal mask
    (llm-analysis; Korthikanti et al. 2022)."""
    return 0.5 * 4 * seq * t.q_dim * t.num_layers


def kv_cache_tokens(t: TextSpec, context: int) -> float:
    """Tokens the KV cache holds per layer for a `context`-token sequence: all of them (full attention)."""
    return context


def kv_bytes_per_token(t: TextSpec, dtype_bytes: int) -> int:
    """KV cache per token per layer: K and V (EleutherAI, Transformer Math 101)."""
    return 2 * t.kv_dim * dtype_bytes


def prefill_bytes_per_token(t: TextSpec, dtype_bytes: int) -> int:
    """One layer's prefill temporaries (residual, normed input, attention output, MLP gate/up/act)."""
    return (t.hidden_size * 4 + t.intermediate_size * 3) * dtype_bytes
