"""Exact analytic parameter counts of LLaVA models (estimation-formulas.md F1, F2).

Counts follow the module tree of transformers' `LlavaForConditionalGeneration`:
`model.language_model` (LlamaModel), `lm_head`, `model.vision_tower` (CLIPVisionModel) and
`model.multi_modal_projector`. A test instantiates each shipped profile on the meta device and
checks every number here against `named_parameters()` exactly (tests/test_params.py).

Per Llama decoder layer (GQA-aware; Megatron/llm-analysis closed form):
  q: h*q + o: q*h + k, v: h*kv each (+ biases if attention_bias) + gate, up, down: 3*h*i (+ biases
  if mlp_bias) + 2 RMSNorm weights of h. Plus embed_tokens V*h, final norm h, lm_head V*h unless tied.
Per CLIP encoder layer: q, k, v, out_proj: 4*(D*D + D); fc1 D*I + I; fc2 I*D + D; 2 LayerNorms 2*2D.
CLIP embeddings: patch conv C*p*p*D (no bias) + class embedding D + position embedding (N+1)*D;
pre_layrnorm and post_layernorm 2D each (post_layernorm holds weights although LLaVA reads
hidden_states[-2]). Projector mlp2x_gelu: d_v*h + h + h*h + h.
LoRA (PEFT, F2): r*(d_in + d_out) per adapted Linear (A: r x d_in, B: d_out x r), no bias.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.specs import LoraSpec, ModelSpec, TextSpec, VisionSpec

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LinearGroup:
    """Identical nn.Linear modules (same shape) of one component."""

    component: str  # "llm" | "vision" | "projector"
    name: str  # module-name suffix (q_proj, ..., out_proj, fc1, fc2, linear_1, linear_2)
    d_in: int
    d_out: int
    bias: bool
    count: int  # how many such modules in the whole model

    @property
    def params(self) -> int:
        """Weights + biases of all modules in the group."""
        return (self.d_in * self.d_out + (self.d_out if self.bias else 0)) * self.count


def text_linear_groups(t: TextSpec) -> list[LinearGroup]:
    h, i, q, kv, L = t.hidden_size, t.intermediate_size, t.q_dim, t.kv_dim, t.num_layers
    ab, mb = t.attention_bias, t.mlp_bias
    return [LinearGroup("llm", "q_proj", h, q, ab, L), LinearGroup("llm", "k_proj", h, kv, ab, L),
            LinearGroup("llm", "v_proj", h, kv, ab, L), LinearGroup("llm", "o_proj", q, h, ab, L),
            LinearGroup("llm", "gate_proj", h, i, mb, L), LinearGroup("llm", "up_proj", h, i, mb, L),
            LinearGroup("llm", "down_proj", i, h, mb, L)]


def vision_linear_groups(v: VisionSpec) -> list[LinearGroup]:
    d, i, L = v.hidden_size, v.intermediate_size, v.num_layers
    return [LinearGroup("vision", n, d, d, True, L) for n in ("q_proj", "k_proj", "v_proj", "out_proj")] + \
           [LinearGroup("vision", "fc1", d, i, True, L), LinearGroup("vision", "fc2", i, d, True, L)]


def projector_linear_groups(model: ModelSpec) -> list[LinearGroup]:
    p = model.projector
    if p is None:
        return []
    if p.kind == "linear":
        return [LinearGroup("projector", "linear_1", p.in_features, p.out_features, True, 1)]
    return [LinearGroup("projector", "linear_1", p.in_features, p.out_features, True, 1),
            LinearGroup("projector", "linear_2", p.out_features, p.out_features, True, 1)]


def linear_groups(model: ModelSpec) -> list[LinearGroup]:
    """Every nn.Linear of the model except lm_head, grouped by shape and name."""
    out = text_linear_groups(model.text)
    if model.vision is not None:
        out += vision_linear_groups(model.vision)
    return out + projector_linear_groups(model)


def vision_other_params(v: VisionSpec) -> int:
    """CLIP embeddings (patch conv, class embedding, position embedding) and all LayerNorms."""
    d = v.hidden_size
    embeddings = v.num_channels * v.patch_size**2 * d + d + v.num_positions * d
    layer_norms = 2 * 2 * d * v.num_layers + 2 * d + 2 * d  # layer_norm1/2 per layer, pre_layrnorm, post_layernorm
    return embeddings + layer_norms


def vision_params(v: VisionSpec) -> int:
    """CLIPVisionModel total."""
    return sum(g.params for g in vision_linear_groups(v)) + vision_other_params(v)


@dataclass(frozen=True)
class ParamCounts:
    llm_linear: int  # weights + biases of the decoder Linear layers (what bitsandbytes quantizes)
    llm_embed: int  # embed_tokens
    llm_lm_head: int  # 0 if tied
    llm_norms: int  # every RMSNorm weight incl. the final norm
    vision_linear: int  # CLIP Linear weights + biases
    vision_other: int  # CLIP embeddings (patch conv, class emb, position emb) and LayerNorms
    projector: int

    @property
    def llm_total(self) -> int:
        return self.llm_linear + self.llm_embed + self.llm_lm_head + self.llm_norms

    @property
    def vision_total(self) -> int:
        return self.vision_linear + self.vision_other

    @property
    def total(self) -> int:
        return self.llm_total + self.vision_total + self.projector


def count_params(model: ModelSpec) -> ParamCounts:
    t = model.text
    groups = linear_groups(model)
    by = {c: sum(g.params for g in groups if g.component == c) for c in ("llm", "vision", "projector")}
    embed = t.vocab_size * t.hidden_size
    return ParamCounts(
        llm_linear=by["llm"], llm_embed=embed, llm_lm_head=0 if t.tie_word_embeddings else embed,
        llm_norms=(2 * t.num_layers + 1) * t.hidden_size,
        vision_linear=by["vision"], vision_other=vision_other_params(model.vision) if model.vision else 0,
        projector=by["projector"])


def _targeted(g: LinearGroup, targets: tuple[str, ...]) -> bool:
    return ALL_LINEAR in targets or g.name in targets


def lora_params(groups: list[LinearGroup], lora: LoraSpec, component: str) -> int:
    """Trainable LoRA parameters on `component`'s targeted Linear layers: sum r*(d_in+d_out)*count.

    Targets are module-name suffixes as in PEFT `target_modules`; "all-linear" adapts every Linear of
    the component (PEFT skips lm_head, which is not in `groups`)."""
    return sum(lora.r * (g.d_in + g.d_out) * g.count for g in groups
               if g.component == component and _targeted(g, lora.targets))


def lora_modules(groups: list[LinearGroup], lora: LoraSpec, component: str) -> int:
    """How many Linear modules of `component` get an adapter."""
    return sum(g.count for g in groups if g.component == component and _targeted(g, lora.targets))


def decoder_layer_params(model: ModelSpec) -> int:
    """Parameters of one LLM decoder layer (Linear weights/biases + its 2 RMSNorms)."""
    t = model.text
    return sum(g.params for g in text_linear_groups(t)) // t.num_layers + 2 * t.hidden_size


def largest_layer_params(model: ModelSpec) -> int:
    """Largest single parameter tensor (DeepSpeed's `largest_layer_params`, e.g. embed_tokens)."""
    t = model.text
    sizes = [t.vocab_size * t.hidden_size] + [g.d_in * g.d_out for g in linear_groups(model)]
    if model.vision is not None:
        v = model.vision
        sizes += [v.num_channels * v.patch_size**2 * v.hidden_size, v.num_positions * v.hidden_size]
    return max(sizes)
