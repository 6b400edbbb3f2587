"""Exact parameter counts of a model, per component, from its families (docs/estimate.md#parameters).

Each family module (families/) gives its nn.Linear groups and its other parameter tensors; this module
adds them up per component (LLM, vision tower, projector) and counts LoRA adapters. A test instantiates
each shipped profile with transformers on the meta device and checks every number here exactly
(tests/test_params.py).
LoRA (PEFT tuners/lora/layer.py): r*(d_in + d_out) per adapted Linear (A: r x d_in, B: d_out x r), no bias.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.families import ALL_LINEAR, LinearGroup, module_for, targeted  # noqa: F401 (re-exported)
from vramplan.estimate.specs import LoraSpec, ModelSpec


def _parts(model: ModelSpec) -> list:
    return [p for p in (model.text, model.vision, model.projector) if p is not None]


def linear_groups(model: ModelSpec) -> list[LinearGroup]:
    """Every nn.Linear of the model except lm_head, grouped by shape and name."""
    return [g for part in _parts(model) for g in module_for(part).linear_groups(part)]


def vision_params(v) -> int:
    """A vision tower's total parameters."""
    fam = module_for(v)
    return sum(g.params for g in fam.linear_groups(v)) + sum(fam.other_params(v).values())


@dataclass(frozen=True)
class ParamCounts:
    llm_linear: int  # weights + biases of the decoder Linear layers (what bitsandbytes quantizes)
    llm_embed: int  # embed_tokens
    llm_lm_head: int  # 0 if tied
    llm_norms: int  # every norm weight incl. the final norm, and other non-Linear tensors (fused MoE experts)
    vision_linear: int  # vision tower Linear weights + biases
    vision_other: int  # vision tower embeddings and norms
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


TRACED_VLM = ("vision", "projector")  # a traced VLM's other parameters, under its text spec (families/traced.py)


def count_params(model: ModelSpec) -> ParamCounts:
    groups = linear_groups(model)
    by = {c: sum(g.params for g in groups if g.component == c) for c in ("llm", "vision", "projector")}
    text = module_for(model.text).other_params(model.text)
    vision_other = sum(module_for(model.vision).other_params(model.vision).values()) if model.vision else 0
    projector_other = sum(module_for(model.projector).other_params(model.projector).values()) if model.projector else 0
    return ParamCounts(llm_linear=by["llm"], llm_embed=text["embed"], llm_lm_head=text["lm_head"],
                       llm_norms=sum(v for k, v in text.items() if k not in ("embed", "lm_head", *TRACED_VLM)),
                       vision_linear=by["vision"], vision_other=vision_other + text.get("vision", 0),
                       projector=by["projector"] + projector_other + text.get("projector", 0))  # traced VLM


def lora_params(groups: list[LinearGroup], lora: LoraSpec, component: str) -> int:
    """Trainable LoRA parameters on `component`'s targeted Linear layers: sum r*(d_in+d_out)*count.

    Targets are module-name suffixes as in PEFT `target_modules`; "all-linear" adapts every Linear of
    the component (PEFT skips lm_head, which is not in `groups`)."""
    return sum(lora.r * (g.d_in + g.d_out) * g.count for g in groups
               if g.component == component and targeted(g, lora.targets))


def lora_modules(groups: list[LinearGroup], lora: LoraSpec, component: str) -> int:
    """How many Linear modules of `component` get an adapter."""
    return sum(g.count for g in groups if g.component == component and targeted(g, lora.targets))


def decoder_layer_params(model: ModelSpec) -> int:
    """Parameters of one LLM decoder layer."""
    return module_for(model.text).layer_params(model.text)


def largest_layer_params(model: ModelSpec) -> int:
    """Largest single parameter tensor (DeepSpeed's `largest_layer_params`, e.g. embed_tokens)."""
    linears = [g.d_in * g.d_out for g in linear_groups(model)]
    return max(linears + [module_for(p).largest_tensor_params(p) for p in (model.text, model.vision) if p is not None])
