"""The traced path: a causal LM no family module derives, described by what was measured on it
(docs/estimate.md#the-traced-path).

`python -m train.trace_model` (docs/contracts.md "Traced step") builds the model from its config.json with
transformers on the meta device and traces whole training steps of it (train/trace.py); vramplan/plan/traced.py
runs it and turns its JSON into a TracedSpec. This module answers the family questions from that record:
  * parameters: the traced model's nn.Linear groups (name suffix and shape; the output head excluded) and its
    other parameters (embedding, untied head, everything else), tied weights once;
  * activations: the traced forward/backward peak above the model states (what autograd saved there, and
    the transients), per (engine, checkpointing) at the traced micro-batch, scaled to another micro-batch by
    the ratio (at a fixed sequence length every activation is proportional to the batch);
  * FLOPs: the Linear groups, and the attention GEMMs from the config's head sizes (Korthikanti et al. 2022).
A spec read from a config.json before the trace (`pending`) has no groups yet; the plan layer traces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vramplan.estimate.activations import ActivationBreakdown
from vramplan.estimate.families import LinearGroup, llama
from vramplan.estimate.families.llama import TextSpec

ROLE = "traced"  # not a text family a config.json's model_type selects: the fallback for all of them
HF_MODEL_TYPES = ()
PROFILE_FIELDS: dict = {}
PLAIN = "plain"  # train/trace.py's engine name for plain PyTorch (Strategy.engine "torch")


@dataclass(frozen=True)
class TracedStep:
    """One traced step: the forward/backward peak above the model states, batch and buffers."""

    engine: str  # "deepspeed" | "plain"
    grad_ckpt: bool
    micro_batch: int
    seq_len: int
    saved_bytes: int  # saved for backward at the peak
    transient_bytes: int  # everything else above the states at the peak
    peak_phase: str


@dataclass(frozen=True)
class TracedSpec(TextSpec):
    """A causal LM as traced: TextSpec's sizes (num_layers, hidden_size, vocab_size, heads, head_dim,
    intermediate_size, tie_word_embeddings, max_position_embeddings) from the transformers config, for the FLOPs,
    buckets and embeddings; the parameter groups and the activation peaks as traced."""

    family: ClassVar[str] = "traced"
    model_type: str = ""
    config_json: str = ""  # the config.json text the trace builds from (sorted keys)
    architecture: str = ""
    linears: tuple[LinearGroup, ...] = ()
    other: tuple[tuple[str, int], ...] = ()  # (embed | lm_head | norms, params)
    layer_param_count: int = 0
    largest_tensor: int = 0
    lora_modules: tuple[str, ...] = ()  # Linear name suffixes PEFT adapts for the recipe's targets
    steps: tuple[TracedStep, ...] = ()
    seconds: float = 0.0  # how long the trace took
    cached: str = ""  # the cache file it was read from ("" = traced now)
    versions: tuple[tuple[str, str], ...] = field(default=())
    analytic_family: str = ""  # --trace on a known family: the family module it stands in for
    processor_json: str = ""  # a VLM's preprocessor_config.json text (the trace runs its image processor)
    image_tokens_per_image: int = 0  # a VLM: the image tokens per image the trace used (0: a causal LM)
    image_size: tuple[int, ...] = ()  # a VLM: the (height, width) the trace's image had


SPEC = TracedSpec


def pending(config_json: str, model_type: str, processor_json: str = "") -> TracedSpec:
    """The spec of a config.json no family module reads, before its trace (with the dir's processor config)."""
    return TracedSpec(num_layers=0, hidden_size=0, intermediate_size=0, num_attention_heads=1, num_key_value_heads=1,
                      vocab_size=0, model_type=model_type, config_json=config_json, processor_json=processor_json)


def from_hf_config(cfg: dict, where: str) -> TracedSpec:
    raise ValueError("the traced path reads no config.json itself (vramplan/plan/traced.py traces it)")


def chat_template(t: TracedSpec) -> str:
    return "llama3" if t.vocab_size >= 128000 else "vicuna_v1"


def linear_groups(t: TracedSpec) -> list[LinearGroup]:
    return list(t.linears)


def other_params(t: TracedSpec) -> dict[str, int]:
    """embed, lm_head, norms; a VLM's also "vision" and "projector" (params.py counts them there)."""
    return {"embed": 0, "lm_head": 0, "norms": 0, **dict(t.other)}


def layer_params(t: TracedSpec) -> int:
    return t.layer_param_count


def largest_tensor_params(t: TracedSpec) -> int:
    return t.largest_tensor


def step_for(t: TracedSpec, engine: str, grad_ckpt: bool) -> TracedStep:
    """The traced step of a candidate's engine (Strategy.engine "torch" = the trace's "plain")."""
    want = PLAIN if engine == "torch" else "deepspeed"
    for st in t.steps:
        if st.engine == want and st.grad_ckpt == grad_ckpt:
            return st
    raise ValueError(f"no traced step for engine {want}, checkpointing {'on' if grad_ckpt else 'off'}")


def traced_activations(t: TracedSpec, micro_batch: int, grad_ckpt: bool, engine: str) -> ActivationBreakdown:
    """The traced peak as the phase model's saved activations and backward transient (gpu_memory.py)."""
    st = step_for(t, engine, grad_ckpt)
    scale = micro_batch / st.micro_batch
    return ActivationBreakdown(llm_saved=int(st.saved_bytes * scale), llm_recompute=0, vision_saved=0,
                               vision_transient=0, projector_saved=0, logits_peak=int(st.transient_bytes * scale),
                               final_norm_saved=0)


TRACED_FORMULAS = {
    "activations_saved": "traced: what autograd saved at the forward/backward peak, x micro-batch / traced one",
    "logits_loss_peak": "traced: every other transient at that peak (logits/loss, recompute, dequant), scaled alike",
}


def relabel(components: list, t: TracedSpec) -> list:
    """The activation components say they were traced, not derived."""
    from dataclasses import replace

    src = f"whole-step trace of {t.architecture or t.model_type} (train/trace.py); docs/estimate.md#the-traced-path"
    return [replace(c, formula=TRACED_FORMULAS[c.name], source=src) if c.name in TRACED_FORMULAS else c
            for c in components]


# --- FLOPs and inference: Llama's forms over the config's head sizes (families/llama.py) ----------------------
attention_flops_per_token = llama.attention_flops_per_token
kv_cache_tokens = llama.kv_cache_tokens
kv_bytes_per_token = llama.kv_bytes_per_token
prefill_bytes_per_token = llama.prefill_bytes_per_token
