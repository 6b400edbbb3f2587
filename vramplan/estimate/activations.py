"""Activation memory of one micro-batch: what autograd saves for backward, per GPU.

The per-layer, per-token coefficients belong to each family (families/llama.py, families/clip.py,
families/llava.py) and are pinned by tests/estimate/test_activation_truth.py, which measures the same
quantity with torch.autograd.graph.saved_tensors_hooks on CPU over a grid of shapes, batch sizes and
sequence lengths. This module composes them for one micro-batch (docs/estimate.md#activations):
  * without checkpointing every decoder layer keeps its saved tensors until backward;
  * gradient checkpointing keeps only each layer's input and recomputes one layer at a time in backward
    (that layer's full activations are live then);
  * the logits/loss backward peaks at LOGIT_PEAK_BYTES per logit: the fp32 log-softmax saved by
    cross_entropy (transformers loss/loss_utils.py ForCausalLMLoss upcasts the logits), the nll_loss gradient
    and the log_softmax_backward output. The bf16 logits are gone by then: HF Trainer's compute_loss returns
    the loss only and drops the model output before backward (transformers trainer.py compute_loss,
    training_step). Seen in the whole-step trace (benchmarks/trace_step.py, docs/estimate.md#checked-against-reality).
  * under SDPA, layers with a sliding window the sequence reaches keep an explicit (b, 1, s, s) mask and k/v
    repeated to every head (the text family's window_mask_bytes_per_token, families/mistral.py): the one
    per-layer term that grows with s^2 besides eager attention's scores;
  * a right-padded micro-batch (2+ samples of different lengths: train/data.py collate pads to the longest) gives
    every SDPA layer that explicit mask and the repeated k/v, window or not (padding_mask_bytes_per_token; pinned
    by tests/estimate/test_padding_mask.py);
  * the loss forward peaks at LOGIT_FORWARD_BYTES per logit: the 16-bit logits, their fp32 upcast and the
    fp32 log-softmax (loss_utils.py ForCausalLMLoss; torch cross_entropy = log_softmax + nll_loss). It is below
    the backward's 12 B unless something lives through the forward only (the autocast cache, below).
Plain-PyTorch training under autocast (HF Trainer bf16/fp16 without DeepSpeed: accelerate wraps the
forward in torch.autocast) adds, as whole-step traced (benchmarks/trace_step.py --engine plain):
  * k-bit: an fp32 residual stream (`residual_bytes` 4): peft utils/other.py prepare_model_for_kbit_training
    casts every non-quantized parameter to fp32 (embeddings, norms, lm_head) and nothing casts them back, so
    the embeddings' output and every residual add are fp32 (the text family's coefficients take the dtype);
  * k-bit: the frozen fp32 lm_head's 16-bit autocast copy, kept by the lm_head matmul for the gradient of its
    input from the loss forward to the lm_head backward (V*h*2 B, in both loss peaks);
  * fp32 trainable weights (peft's adapters, `trainable_dtype` fp32): autocast's weight-cast cache (torch
    aten/src/ATen/autocast_mode.cpp cached_cast: a leaf that requires grad is cast once per autocast region
    and the copy kept until the region exits, torch/amp/autocast_mode.py __exit__ clear_autocast_cache).
    Without checkpointing the matmuls also save the copies for backward, so they live until backward;
    with checkpointing they live through the forward and the loss forward only, and each recomputed layer
    makes its own in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.families import module_for
from vramplan.estimate.families.mistral import repeated_kv_bytes_per_token
from vramplan.estimate.specs import LoraSpec, ProjectorSpec, TextSpec, VisionSpec

LOGIT_PEAK_BYTES = 12  # s*b*V*(4 + 4 + 4) at the log-softmax backward (whole-step trace; see above)
LOGIT_FORWARD_BYTES = 10  # s*b*V*(2 + 4 + 4) in the loss forward: 16-bit logits, fp32 upcast, log-softmax


def llm_layer_bytes_per_token(t: TextSpec, mode: str, lora: LoraSpec | None, attn: str, seq: int,
                              compute_bytes: int = 2, kbit_saves_inputs: bool = False,
                              residual_bytes: int = 0, adapter_casts: bool = False) -> float:
    """Saved-for-backward bytes per token of one decoder layer (no checkpointing); see the text family."""
    return module_for(t).saved_bytes_per_token(t, mode, lora, attn, seq, compute_bytes, kbit_saves_inputs,
                                               residual_bytes, adapter_casts)


def vision_layer_bytes_per_token(v: VisionSpec, lora: LoraSpec | None) -> float:
    """Saved bytes per token of one vision layer; 0 for a frozen tower without adapters."""
    return module_for(v).saved_bytes_per_token(v, lora)


@dataclass(frozen=True)
class ActivationBreakdown:
    """Bytes for one micro-batch on one GPU. `saved` is live until backward; the others are
    transient peaks that are not simultaneously live (see gpu_memory.py's phase model)."""

    llm_saved: int  # decoder layers (all of them, or only layer inputs with checkpointing)
    llm_recompute: int  # one layer's full activations, live while it is recomputed (checkpointing)
    vision_saved: int
    vision_transient: int  # the tower's forward hidden states
    projector_saved: int
    logits_peak: int  # loss backward peak
    final_norm_saved: int
    weight_casts: int = 0  # autocast copies of fp32 trainable weights (saved without checkpointing)
    logits_forward: int = 0  # loss forward peak
    head_cast: int = 0  # autocast copy of a frozen fp32 lm_head, live in both loss peaks
    sdpa_masks: int = 0  # of llm_saved (or llm_recompute with checkpointing): SDPA's explicit masks + repeated k/v


def padding_mask_bytes_per_token(t: TextSpec, attn: str, seq: int, compute_bytes: int = 2) -> tuple[int, float]:
    """A right-padded micro-batch under SDPA: (layers that pay, saved bytes per token in each).

    train/data.py collate pads a micro-batch to its longest sample and passes the 0/1 attention_mask, so
    transformers cannot hand SDPA is_causal=True (masking_utils.py _ignore_causal_mask_sdpa: only an all-ones
    mask is dropped) and gives every layer the boolean (b, 1, s, s) mask. Each layer then keeps what a sliding
    window costs (families/mistral.py window_mask_bytes_per_token): the additive mask torch makes per call
    (aten attention.cpp convert_boolean_attn_mask, `compute_bytes * s` per token) and k, v repeated to every
    query head (integrations/sdpa_attention.py use_gqa_in_sdpa refuses enable_gqa with a mask:
    `2 * compute_bytes * (q - kv)`, none with one kv head: families/mistral.py repeated_kv_bytes_per_token).
    Eager attention (and Gemma 2's soft-capped "sdpa", which runs eager) adds
    the mask to its scores and keeps nothing more; flash attention unpads instead. Not counted: the shared
    boolean mask itself (1 B per query-key pair, once), which checkpointing keeps until backward."""
    if attn != "sdpa" or getattr(t, "attn_softcap", False):
        return 0, 0.0
    return t.num_layers, compute_bytes * seq + repeated_kv_bytes_per_token(t, compute_bytes)


def _vision(
    v: VisionSpec, lora: LoraSpec | None, images: float, grad_ckpt: bool, compute_bytes: int,
    tower_tokens: int | None = None,
) -> tuple[float, float]:
    """(saved, forward transient) of the vision tower for `images` images of `tower_tokens` tokens each (all
    crops; None: one crop of the family's tokens_per_image)."""
    fam = module_for(v)
    per_crop = fam.tokens_per_image(v)
    vtok = (per_crop if tower_tokens is None else tower_tokens) * images
    per_layer = fam.saved_bytes_per_token(v, lora) * vtok
    if per_layer and grad_ckpt:
        saved = v.num_layers * fam.checkpointed_bytes_per_token(v, compute_bytes) * vtok + per_layer
    else:
        saved = v.num_layers * per_layer
    return saved, fam.forward_transient_bytes(v, vtok / per_crop, compute_bytes)  # in crops of per_crop tokens


def activation_bytes(t: TextSpec, v: VisionSpec | None, *, micro_batch: int, seq: int, images_per_sample: float,
                     llm_mode: str, llm_lora: LoraSpec | None, vision_lora: LoraSpec | None,
                     grad_ckpt: bool, attn: str = "sdpa", compute_bytes: int = 2,
                     projector: ProjectorSpec | None = None, projector_trained: bool = True,
                     kbit_saves_inputs: bool = False, residual_bytes: int = 0, cast_params: int = 0,
                     llm_cast_params: int = 0, head_cast: bool = False, tower_tokens: int | None = None,
                     projector_tokens: int | None = None, padded: bool = False) -> ActivationBreakdown:
    """kbit_saves_inputs: the LLM's Linears are 4-bit ones of a bitsandbytes release that keeps each
    Linear's input for backward (Job.kbit_saves_inputs; the text family's kbit_input_bytes_per_token).
    Plain PyTorch under autocast (module text): residual_bytes, the residual stream's dtype (0: the compute
    dtype); cast_params, the fp32 trainable parameters autocast casts (llm_cast_params of them in the
    decoder layers); head_cast, the lm_head is a frozen fp32 weight cast per forward. tower_tokens and
    projector_tokens: per image, from the projector family at the planned image size (ModelSpec.tower_tokens,
    .projector_tokens); None: one crop of the vision family's. padded: the micro-batch's samples differ in length
    (right-padded, padding_mask_bytes_per_token)."""
    text = module_for(t)
    tokens = micro_batch * seq
    rb = residual_bytes or compute_bytes
    per_layer = text.saved_bytes_per_token(t, llm_mode, llm_lora, attn, seq, compute_bytes,
                                           kbit_saves_inputs, residual_bytes, cast_params > 0) * tokens
    if hasattr(text, "saved_bytes_per_layer"):  # saves that do not scale with tokens (merged MoE adapter weights)
        per_layer += text.saved_bytes_per_layer(t, llm_lora, compute_bytes)
    # the layers whose SDPA takes an explicit sliding-window mask keep it (b*s^2) and repeated k/v besides
    mask_layers, mask_per_token = getattr(text, "window_mask_bytes_per_token", lambda *a: (0, 0.0))(
        t, attn, seq, compute_bytes)
    if padded:  # every layer gets a mask now, the sliding ones included (at the same cost)
        pad_layers, pad_per_token = padding_mask_bytes_per_token(t, attn, seq, compute_bytes)
        if pad_layers:
            mask_layers, mask_per_token = pad_layers, pad_per_token
    masks = mask_per_token * tokens * (min(mask_layers, 1) if grad_ckpt else mask_layers)
    if grad_ckpt:
        llm_saved = t.num_layers * text.checkpointed_bytes_per_token(t, rb) * tokens  # layer inputs only
        llm_recompute = per_layer + llm_cast_params * compute_bytes / t.num_layers  # + that layer's casts
        llm_recompute += mask_per_token * tokens if mask_layers else 0  # the largest layer: a sliding one
        if hasattr(text, "dispatch_bytes_per_token"):  # + a MoE layer's dispatch buffers (families/mixtral.py)
            llm_recompute += text.dispatch_bytes_per_token(t) * tokens
    else:
        llm_saved = t.num_layers * per_layer + mask_layers * mask_per_token * tokens
        llm_recompute = 0
    vision_saved = vision_transient = projector_saved = 0
    if v is not None and images_per_sample > 0:
        n_img = micro_batch * images_per_sample
        vision_saved, vision_transient = _vision(v, vision_lora, n_img, grad_ckpt, compute_bytes, tower_tokens)
        if projector_trained and projector is not None:
            per_image = module_for(v).image_tokens(v) if projector_tokens is None else projector_tokens
            image_tokens = per_image * n_img
            projector_saved = int(
                image_tokens * module_for(projector).saved_bytes_per_image_token(projector, compute_bytes)
            )
    head = compute_bytes * t.vocab_size * t.hidden_size if head_cast else 0
    # a family's ops on the logits before the loss (families/gemma.py: the final soft-cap) add to both peaks
    extra = getattr(text, "loss_extra_bytes_per_logit", lambda t, cb: 0)(t, compute_bytes)
    logits = (LOGIT_PEAK_BYTES + extra) * tokens * t.vocab_size
    final_norm = text.final_norm_bytes_per_token(t, compute_bytes) * tokens
    return ActivationBreakdown(int(llm_saved), int(llm_recompute), int(vision_saved), int(vision_transient),
                               int(projector_saved), int(logits), int(final_norm), int(cast_params * compute_bytes),
                               int((LOGIT_FORWARD_BYTES + extra) * tokens * t.vocab_size), int(head), int(masks))
