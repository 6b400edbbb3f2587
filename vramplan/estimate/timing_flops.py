"""FLOPs and bytes of one training sample, per pass (docs/estimate.md#time).

Model FLOPs per LLM token (Kaplan et al. 2020, arXiv:2001.08361 §2.1: 6N; Narayanan et al. 2021,
arXiv:2104.04473 §5.1), counted over the matmul weights only (the embedding lookup is a gather, not a matmul):
- a trainable weight: 2 forward + 4 backward (2 for the input gradient, 2 for its weight gradient) = 6;
- a frozen weight: 2 forward + 2 backward (the input gradient only; its weight-gradient GEMM is skipped) = 4;
- a LoRA adapter is a trainable weight: 6.
Attention score/value GEMMs come from the text family (forward); backward is twice the forward.
Gradient checkpointing recomputes the forward once more: recompute FLOPs, charged on top of the model FLOPs.
The vision tower runs forward only (frozen, no gradient through it) unless it carries LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.families import module_for
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.specs import ModelSpec


@dataclass(frozen=True)
class SampleWork:
    """One sample's work: FLOPs per pass and the matmul weights each pass reads."""

    forward_flops: float
    backward_flops: float
    recompute_flops: float  # 0 without gradient checkpointing
    matmul_params: int  # weights the GEMMs read each pass (LLM + vision tower + projector)
    layers: int  # decoder layers (+ vision layers), for the per-layer host cost

    @property
    def model_flops(self) -> float:
        return self.forward_flops + self.backward_flops


def llm_matmul_params(model: ModelSpec, active: bool = False) -> int:
    """Weights the LLM multiplies by: every decoder Linear plus lm_head (the tied embedding when tied), and a
    mixture of experts' fused expert and router tensors. active: only those one token multiplies by, its k
    routed experts of E (families/mixtral.py active_matmul_params); FLOPs use these, weight reads all."""
    from vramplan.estimate.params import count_params

    c, t = count_params(model), model.text
    fam = module_for(t)
    head = t.vocab_size * t.hidden_size
    if not hasattr(fam, "active_matmul_params"):
        return c.llm_linear + head
    if active:
        return fam.active_matmul_params(t, c.llm_linear) + head
    other = fam.other_params(t)
    return c.llm_linear + other.get("experts", 0) + other.get("router", 0) + head


def elementwise_bytes_per_token(model: ModelSpec, compiled: bool) -> float:
    """HBM bytes the non-GEMM ops of one forward move per token, all decoder layers (16-bit activations).

    Eager transformers Llama layer (models/llama/modeling_llama.py), bytes read + written per token: two RMSNorms
    with their fp32 upcast (~40h each), rotary on q and k (~28 (q + kv)), SiLU and the gate product (~10i),
    residual adds and reshapes (~20h); torch.compile (Inductor) fuses each chain into one kernel that reads its
    inputs and writes its output once (~8h per norm, 4 (q + kv) rotary, 6i, 4h)."""
    t = model.text
    fam = module_for(t)  # a mixture of experts: the k routed copies (+ shared expert) of the MLP per token
    i = fam.active_intermediate_size(t) if hasattr(fam, "active_intermediate_size") else t.intermediate_size
    if compiled:
        per = 20 * t.hidden_size + 4 * (t.q_dim + t.kv_dim) + 6 * i
    else:
        per = 100 * t.hidden_size + 28 * (t.q_dim + t.kv_dim) + 10 * i
    return float(per * t.num_layers)


def sample_work(model: ModelSpec, g: ParamGroups, seq: int, images: float, grad_ckpt: bool,
                vision_trainable: bool) -> SampleWork:
    from vramplan.estimate.params import count_params

    c = count_params(model)
    w = llm_matmul_params(model, active=True)
    lora = g.trainable_llm_lora
    full = w if g.trainable_llm_full else 0
    attn = module_for(model.text).attention_flops_per_token(model.text, seq)
    fwd = seq * (2 * (w + lora) + attn)
    bwd = seq * (2 * (w + lora) + 2 * (full + lora) + 2 * attn)
    llm_fwd = fwd
    layers = model.text.num_layers
    matmul = llm_matmul_params(model)  # a pass over many tokens reads every expert
    if model.vision is not None and images:
        positions = model.tower_tokens  # every crop the tower processes per image
        v_fwd = images * 2 * (c.vision_total + g.trainable_vision_lora) * positions
        fwd += v_fwd
        if vision_trainable:
            bwd += 2 * v_fwd
        layers += model.vision.num_layers
        matmul += c.vision_total
    if c.projector and images:
        p_fwd = images * 2 * c.projector * model.projector_tokens
        fwd += p_fwd
        bwd += 2 * p_fwd if g.trainable_projector else 0
        matmul += c.projector
    return SampleWork(float(fwd), float(bwd), float(llm_fwd) if grad_ckpt else 0.0, matmul, layers)
