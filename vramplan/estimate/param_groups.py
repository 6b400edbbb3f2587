"""Split a model's parameters into the groups that memory depends on, for one recipe.

Groups: 4-bit/8-bit quantized frozen Linear weights; frozen 16-bit (or fp32-upcast)
weights; trainable parameters (LoRA adapters, projector, or the whole LLM for `full`).
Counts come from vramplan.estimate.params (exact, checked against transformers on the meta device).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.families import module_for
from vramplan.estimate.specs import ModelSpec, RecipeSpec
from vramplan.estimate.types import Quant

# bitsandbytes 4-bit storage (bitsandbytes.functional.quantize_4bit, Linear4bit defaults):
NF4_BLOCKSIZE = 64  # elements per absmax block
NF4_NESTED_BLOCKSIZE = 256  # double quant: absmax values per nested fp32 absmax (bnb compress_statistics)
NF4_CODE_BYTES = 16 * 4  # the 16-value NF4 code table, fp32, kept in each QuantState
NF4_NESTED_CODE_BYTES = 256 * 4 + 4  # double quant: 8-bit dynamic code table + fp32 offset


def nf4_tensor_bytes(n: int, double_quant: bool) -> float:
    """Bytes of one NF4-quantized weight of n elements incl. its quant state.

    QLoRA (Dettmers et al. 2023, arXiv:2305.14314 §3): 4 bits per weight plus one fp32 absmax
    per 64-block = 0.5 + 0.0625 B/param; double quant stores absmax as 8-bit with one fp32
    absmax per 256 blocks = 0.5 + 1/64 + 4/(64*256) B/param.
    """
    blocks = -(-n // NF4_BLOCKSIZE)
    b = -(-n // 2) + NF4_CODE_BYTES
    if double_quant:
        b += blocks + 4 * -(-blocks // NF4_NESTED_BLOCKSIZE) + NF4_NESTED_CODE_BYTES
    else:
        b += 4 * blocks
    return b


def int8_tensor_bytes(d_in: int, d_out: int) -> int:
    """LLM.int8 (bitsandbytes Linear8bitLt): 1 B/weight + one fp32 scale per output row (SCB)."""
    return d_in * d_out + 4 * d_out


@dataclass(frozen=True)
class ParamGroups:
    """Parameter counts and the quantized group's exact bytes."""

    quantized_params: int  # frozen LLM Linear weights stored in 4/8 bit
    quantized_bytes: int  # their storage incl. quant state
    quantized_tensors: int
    frozen_params: int  # frozen, not quantized (embeddings, lm_head, norms, vision tower, ...)
    trainable_llm_lora: int
    trainable_vision_lora: int
    trainable_projector: int
    trainable_llm_full: int
    total_params: int  # base model params (no adapters)
    largest_linear_elems: int  # largest LLM Linear weight (the 4-bit dequant transient)
    decoder_layer_params: int
    layer_fused_params: int = 0  # a MoE layer's fused expert and router tensors: never quantized (families/mixtral.py)

    @property
    def trainable(self) -> int:
        return self.trainable_llm_lora + self.trainable_vision_lora + self.trainable_projector + self.trainable_llm_full


def param_groups(model: ModelSpec, recipe: RecipeSpec) -> ParamGroups:
    from vramplan.estimate.params import count_params, decoder_layer_params, linear_groups, lora_params

    counts = count_params(model)
    groups = linear_groups(model)
    llm_lin = [g for g in groups if g.component == "llm"]
    llm_lora = lora_params(groups, recipe.llm_lora, "llm") if recipe.llm_lora else 0
    t = model.text
    on_params = getattr(module_for(t), "parameter_lora_params", None)  # PEFT target_parameters (MoE experts)
    llm_lora += on_params(t, recipe.llm_lora) if on_params and recipe.llm_lora else 0
    if recipe.llm_lora and "lm_head" in recipe.llm_lora.targets:
        # PEFT adapts lm_head only when named (its "all-linear" skips it): A is r x h, B is V x r
        llm_lora += recipe.llm_lora.r * (t.hidden_size + t.vocab_size)
    # peft modules_to_save (ModulesToSaveWrapper): a trained full copy beside the frozen original
    saved = sum(t.vocab_size * t.hidden_size for m in recipe.modules_to_save
                if m == "embed_tokens" or (m == "lm_head" and not t.tie_word_embeddings))
    vis_lora = lora_params(groups, recipe.vision_lora, "vision") if (recipe.vision_lora and model.vision) else 0
    projector = counts.projector if recipe.train_projector else 0
    full = (counts.llm_total if recipe.train_llm_full else 0) + (0 if recipe.train_llm_full else saved)

    q_params = q_bytes = q_tensors = 0
    if recipe.quant in Quant.KBIT and not recipe.train_llm_full:
        for g in llm_lin:
            n = g.d_in * g.d_out
            q_params += n * g.count
            q_tensors += g.count
            per = (
                nf4_tensor_bytes(n, recipe.double_quant)
                if recipe.quant == Quant.NF4
                else int8_tensor_bytes(g.d_in, g.d_out)
            )
            q_bytes += int(per) * g.count
            # biases of quantized Linear layers stay in 16-bit: counted with the frozen group below
    frozen = counts.total - q_params - projector - (counts.llm_total if recipe.train_llm_full else 0)
    if projector and (recipe.llm_lora or recipe.vision_lora):
        # peft's modules_to_save wraps the projector: the original stays (frozen) beside the trained copy
        frozen += projector
    largest = max((g.d_in * g.d_out for g in llm_lin), default=0)

    other = module_for(t).other_params(t)
    fused = (other.get("experts", 0) + other.get("router", 0)) // max(1, getattr(t, "sparse_layers", t.num_layers))
    return ParamGroups(q_params, q_bytes, q_tensors, frozen, llm_lora, vis_lora, projector, full, counts.total,
                       largest, decoder_layer_params(model), fused)
