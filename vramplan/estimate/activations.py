"""Activation memory of one micro-batch: what autograd saves for backward, per GPU.

The per-layer coefficients below are bytes per token per layer for a 16-bit compute dtype
(bf16/fp16), counted op by op from what the Hugging Face Llama / CLIP layers save for
backward (transformers 5.x, SDPA attention, module cast to bf16 as DeepSpeed does), and
pinned by tests/estimate/test_activation_truth.py, which measures the same quantity with
torch.autograd.graph.saved_tensors_hooks on CPU over a grid of shapes, batch sizes and
sequence lengths. The structure follows Korthikanti et al. 2022 (arXiv:2205.05198) and
vramcalc's measured Llama element count (see ../shared/reference/estimation-formulas.md F8):

Llama decoder layer, per token (h hidden, q = heads*d_head, kv = kv_heads*d_head, i MLP, a heads):
  * weights trainable (full FT):      16h + 4q + 4kv + 8i + 4a + 8
  * weights frozen, LoRA adapters:    14h + 4q + 4kv + 7i + 4a + 8
                                      + per adapted Linear: 2r (the A output)
                                      + 3*d_in if lora_dropout > 0 (dropped copy + 1-byte mask)
  * weights frozen, no adapters, but gradients must flow to earlier trainable modules
    (projector pretraining):          8h + 4q + 4kv + 6i + 4a + 8
  where 16h = two RMSNorms (fp32 upcast 4h + normalised 2h + output 2h, each), 4q/4kv = SDPA's
  saved q,k,v and output, 8i = gate, SiLU output, up and their product, 4a = SDPA's fp32
  logsumexp, 8 = the norms' fp32 rstd.
  * eager attention adds the softmax probabilities: a*s*(2+4) per token, minus the 4a logsumexp.
  * gradient checkpointing keeps only each layer's input (2h per token) and recomputes one layer
    at a time in backward (that layer's full activations are live then).
CLIP encoder layer with LoRA, per token: 16h + 6i + 4a + 8 (+ LoRA terms, see below). A frozen tower with
no adapters saves nothing (no parameter or input needs a gradient).
Logits/loss (F9, vramcalc measured): 14 bytes per logit at the loss backward peak (bf16 logits,
fp32 upcast, fp32 log-softmax and its gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.specs import LoraSpec, TextSpec, VisionSpec

LOGIT_PEAK_BYTES = 14  # F9: s*b*V*(2 + 4 + 4 + 4) at the log-softmax backward (vramcalc)

LLM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _targets(lora: LoraSpec | None, names: tuple[str, ...]) -> tuple[str, ...]:
    if lora is None:
        return ()
    if "all-linear" in lora.targets:
        return names
    return tuple(n for n in names if n in lora.targets)


def llm_linear_inputs(t: TextSpec) -> dict[str, int]:
    """Input width of each decoder Linear."""
    return {"q_proj": t.hidden_size, "k_proj": t.hidden_size, "v_proj": t.hidden_size, "o_proj": t.q_dim,
            "gate_proj": t.hidden_size, "up_proj": t.hidden_size, "down_proj": t.intermediate_size}


def vision_linear_inputs(v: VisionSpec) -> dict[str, int]:
    h = v.hidden_size
    return {"q_proj": h, "k_proj": h, "v_proj": h, "out_proj": h, "fc1": h, "fc2": v.intermediate_size}


def _lora_terms(lora: LoraSpec | None, inputs: dict[str, int], names: tuple[str, ...]) -> int:
    targeted = _targets(lora, names)
    if not targeted:
        return 0
    per = 2 * lora.r * len(targeted)
    if lora.dropout > 0:
        per += 3 * sum(inputs[n] for n in targeted)
    return per


def llm_layer_bytes_per_token(t: TextSpec, mode: str, lora: LoraSpec | None, attn: str, seq: int,
                              compute_bytes: int = 2) -> float:
    """Saved-for-backward bytes per token of one decoder layer (no checkpointing).

    mode: "full" (weights trainable), "lora" (frozen + adapters), "frozen" (no adapters,
    gradient flows through to earlier modules).
    """
    h, q, kv, i, a = t.hidden_size, t.q_dim, t.kv_dim, t.intermediate_size, t.num_attention_heads
    if mode == "full":
        b = 16 * h + 4 * q + 4 * kv + 8 * i + 4 * a + 8
    elif mode == "lora":
        b = 14 * h + 4 * q + 4 * kv + 7 * i + 4 * a + 8 + _lora_terms(lora, llm_linear_inputs(t), LLM_LINEAR_NAMES)
    elif mode == "frozen":
        b = 8 * h + 4 * q + 4 * kv + 6 * i + 4 * a + 8
    else:
        raise ValueError(mode)
    if attn == "eager":
        b += a * seq * 6 - 4 * a
    # coefficients are for 16-bit compute; fp32 compute doubles the 16-bit saves (approximation)
    return b * (compute_bytes / 2) if compute_bytes != 2 else b


def vision_layer_bytes_per_token(v: VisionSpec, lora: LoraSpec | None) -> float:
    """Saved bytes per token of one CLIP layer; 0 when the tower has no adapters (frozen, no grad).

    Measured (tests/estimate/test_activation_truth.py): 16h + 6i + 4a + 8, plus 2r per adapted
    Linear, plus with dropout 3 B per input element of each adapted Linear fed by h (q/k/v/out/fc1),
    2 B for fc2's, and h more when attention projections are adapted.
    """
    targeted = _targets(lora, VISION_LINEAR_NAMES)
    if not targeted:
        return 0.0
    h, i = v.hidden_size, v.intermediate_size
    b = 16 * h + 6 * i + 4 * v.num_attention_heads + 8 + 2 * lora.r * len(targeted)
    if lora.dropout > 0:
        b += sum(2 * i if n == "fc2" else 3 * h for n in targeted)
        if any(n in targeted for n in ("q_proj", "k_proj", "v_proj")):
            b += h
    return b


@dataclass(frozen=True)
class ActivationBreakdown:
    """Bytes for one micro-batch on one GPU. `saved` is live until backward; the others are
    transient peaks that are not simultaneously live (see memory.py's phase model)."""

    llm_saved: int  # decoder layers (all of them, or only layer inputs with checkpointing)
    llm_recompute: int  # one layer's full activations, live while it is recomputed (checkpointing)
    vision_saved: int
    vision_transient: int  # CLIP forward hidden states (output_hidden_states=True keeps all layers)
    projector_saved: int
    logits_peak: int  # loss backward peak
    final_norm_saved: int


def activation_bytes(t: TextSpec, v: VisionSpec | None, *, micro_batch: int, seq: int, images_per_sample: float,
                     llm_mode: str, llm_lora: LoraSpec | None, vision_lora: LoraSpec | None,
                     grad_ckpt: bool, attn: str = "sdpa", compute_bytes: int = 2,
                     projector_in: int = 0, projector_trained: bool = True) -> ActivationBreakdown:
    tokens = micro_batch * seq
    per_layer = llm_layer_bytes_per_token(t, llm_mode, llm_lora, attn, seq, compute_bytes) * tokens
    if grad_ckpt:
        llm_saved = t.num_layers * compute_bytes * t.hidden_size * tokens  # layer inputs only
        llm_recompute = per_layer
    else:
        llm_saved = t.num_layers * per_layer
        llm_recompute = 0
    vision_saved = vision_transient = projector_saved = 0
    if v is not None and images_per_sample > 0:
        n_img = micro_batch * images_per_sample
        vtok = v.num_positions * n_img
        per_v = vision_layer_bytes_per_token(v, vision_lora) * vtok
        if per_v and grad_ckpt:
            vision_saved = v.num_layers * compute_bytes * v.hidden_size * vtok + per_v
        else:
            vision_saved = v.num_layers * per_v
        # hidden states of every layer (+ embeddings) are returned when LLaVA selects layer -2
        vision_transient = (v.num_layers + 1) * vtok * v.hidden_size * compute_bytes
        if projector_trained and projector_in:
            # Linear(d_v,h) input, GELU input, Linear(h,h) input, per image token
            projector_saved = int(v.num_patches * n_img * (projector_in + 2 * t.hidden_size) * compute_bytes)
    logits = LOGIT_PEAK_BYTES * tokens * t.vocab_size
    final_norm = (4 + 2 * compute_bytes) * t.hidden_size * tokens
    return ActivationBreakdown(int(llm_saved), int(llm_recompute), int(vision_saved), int(vision_transient),
                               int(projector_saved), int(logits), int(final_norm))
