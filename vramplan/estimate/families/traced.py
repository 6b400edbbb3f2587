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
from vramplan.estimate.families import LinearGroup

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
class TracedSpec:
    """A causal LM as traced. Sizes the estimate reads besides the groups come from the transformers config."""

    family: ClassVar[str] = "traced"
    model_type: str
    config_json: str  # the config.json text the trace builds from (sorted keys)
    architecture: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 0
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

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // max(1, self.num_attention_heads)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.d_head


SPEC = TracedSpec


def pending(config_json: str, model_type: str) -> TracedSpec:
    """The spec of a config.json no family module reads, before its trace."""
    return TracedSpec(model_type=model_type, config_json=config_json)


def from_hf_config(cfg: dict, where: str) -> TracedSpec:
    raise ValueError("the traced path reads no config.json itself (vramplan/plan/traced.py traces it)")


def chat_template(t: TracedSpec) -> str:
    return "llama3" if t.vocab_size >= 128000 else "vicuna_v1"


def linear_groups(t: TracedSpec) -> list[LinearGroup]:
    return list(t.linears)


def other_params(t: TracedSpec) -> dict[str, int]:
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


# --- FLOPs and inference (config sizes) -------------------------------------------------------------------
def attention_flops_per_token(t: TracedSpec, seq: int) -> float:
    """Score and value GEMMs, forward, all layers, halved by the causal mask (as families/llama.py)."""
    return 0.5 * 4 * seq * t.q_dim * t.num_layers


def kv_cache_tokens(t: TracedSpec, context: int) -> float:
    return context


def kv_bytes_per_token(t: TracedSpec, dtype_bytes: int) -> int:
    return 2 * t.kv_dim * dtype_bytes


def prefill_bytes_per_token(t: TracedSpec, dtype_bytes: int) -> int:
    return (t.hidden_size * 4 + t.intermediate_size * 3) * dtype_bytes
