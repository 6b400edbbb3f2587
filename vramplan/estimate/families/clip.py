"""The CLIP ViT vision tower (transformers `CLIPVisionModel`: pre-LN, quick-GELU MLP, biases everywhere).

Parameters (models/clip/modeling_clip.py; exact on the meta device, tests/test_params.py): per encoder
layer q, k, v, out_proj 4*(D*D + D), fc1 D*I + I, fc2 I*D + D, two LayerNorms 2*2D; embeddings: the patch
conv C*p*p*D (no bias) + class embedding D + position embedding (N+1)*D; pre_layrnorm and post_layernorm
2D each (post_layernorm holds weights although LLaVA reads hidden_states[-2]).

Activations (docs/estimate.md#activations): a frozen tower with no adapters saves nothing (no parameter or
input needs a gradient). With LoRA, per token per layer: 16h + 6i + 4a + 8, plus 2r per adapted Linear,
plus with dropout 3 B per input element of each adapted Linear fed by h (q/k/v/out/fc1), 2 B for fc2's,
and h more when attention projections are adapted (measured, tests/estimate/test_activation_truth.py).
The forward returns every layer's hidden states (LLaVA selects layer -2 with output_hidden_states=True).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require
from vramplan.estimate.families import LinearGroup, targeted

ROLE = "vision"
HF_MODEL_TYPES = ("clip_vision_model", "clip")
PROFILE_FIELDS = {
    "num_layers": (int, True, 1), "hidden_size": (int, True, 1), "intermediate_size": (int, True, 1),
    "num_attention_heads": (int, True, 1), "image_size": (int, True, 1), "patch_size": (int, True, 1),
    "num_channels": (int, False, 1), "feature_layer": (int, False, None),
}
# transformers' CLIPVisionConfig defaults, for keys a config.json may omit
HF_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 224, "patch_size": 32, "num_channels": 3}


@dataclass(frozen=True)
class VisionSpec:
    """A CLIP ViT tower's config."""

    family: ClassVar[str] = "clip"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    feature_layer: int = -2  # LLaVA takes hidden_states[-2]; all layers still hold weights

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1  # + CLS


SPEC = VisionSpec  # the family's config dataclass (profiles build it from their table)


def from_hf_config(cfg: dict, where: str, defaults: dict | None = None, feature_layer: int = -2,
                   prefix: str = "") -> VisionSpec:
    """VisionSpec from a `CLIPVisionConfig`-shaped dict (or a full CLIPConfig holding `vision_config`).
    A key that is absent or null takes CLIPVisionConfig's default; a wrong type or range is a ContractError."""
    return read_vit_config(cfg, where, VisionSpec, "clip", {**HF_DEFAULTS, **(defaults or {})}, feature_layer, prefix)


def read_vit_config(cfg: dict, where: str, spec_cls, composite_type: str, d: dict, feature_layer: int, prefix: str,
                    extra: dict | None = None):
    """A ViT tower's spec (CLIP, SigLIP) from its config dict, or from the `vision_config` of a composite config
    of `composite_type`; `d` holds the defaults, `extra` {field: (config key, type)} more keys."""
    if cfg.get("model_type") == composite_type and "vision_config" in cfg:
        cfg = require(cfg, "vision_config", dict, where, label=prefix + "vision_config")
        prefix += "vision_config."

    def get(key, kind=int):
        v = require(cfg, key, kind, where, label=prefix + key, min=1 if kind is int else None, allow_none=True,
                    default=None)
        return d.get(key) if v is None else v

    spec = spec_cls(num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
                    intermediate_size=get("intermediate_size"), num_attention_heads=get("num_attention_heads"),
                    image_size=get("image_size"), patch_size=get("patch_size"), num_channels=get("num_channels"),
                    feature_layer=feature_layer, **{f: get(k, t) for f, (k, t) in (extra or {}).items()})
    if spec.patch_size > spec.image_size:
        raise ContractError(f"{where}: {prefix}patch_size: {spec.patch_size} is larger than image_size "
                            f"{spec.image_size} (no patch fits)")
    if not -(spec.num_layers + 1) <= feature_layer <= spec.num_layers:  # hidden_states: embeddings + each layer
        raise ContractError(f"{where}: vision_feature_layer: {feature_layer} is not a layer of a "
                            f"{spec.num_layers}-layer tower (in [{-(spec.num_layers + 1)}, {spec.num_layers}])")
    return spec


# --- parameters --------------------------------------------------------------------------------------------
def linear_groups(v: VisionSpec) -> list[LinearGroup]:
    d, i, L = v.hidden_size, v.intermediate_size, v.num_layers
    return [LinearGroup("vision", n, d, d, True, L) for n in ("q_proj", "k_proj", "v_proj", "out_proj")] + \
           [LinearGroup("vision", "fc1", d, i, True, L), LinearGroup("vision", "fc2", i, d, True, L)]


def other_params(v: VisionSpec) -> dict[str, int]:
    """Embeddings (patch conv, class embedding, position embedding) and all LayerNorms."""
    d = v.hidden_size
    return {"embeddings": v.num_channels * v.patch_size**2 * d + d + v.num_positions * d,
            # layer_norm1/2 per layer, pre_layrnorm, post_layernorm
            "layer_norms": 2 * 2 * d * v.num_layers + 2 * d + 2 * d}


def largest_tensor_params(v: VisionSpec) -> int:
    sizes = [g.d_in * g.d_out for g in linear_groups(v)]
    return max(sizes + [v.num_channels * v.patch_size**2 * v.hidden_size, v.num_positions * v.hidden_size])


# --- tokens and activations --------------------------------------------------------------------------------
def tokens_per_image(v: VisionSpec) -> int:
    """Tokens the tower processes per image: patches + CLS."""
    return v.num_positions


def image_tokens(v: VisionSpec) -> int:
    """Features per image handed to the projector and the LLM (LLaVA drops CLS: the "default" strategy)."""
    return v.num_patches


def saved_bytes_per_token(v: VisionSpec, lora) -> float:
    """Saved bytes per token of one layer; 0 when the tower has no adapters (frozen, no grad)."""
    return vit_layer_saved_bytes(v, lora, linear_groups(v), mlp_act_bytes=6)


def vit_layer_saved_bytes(v, lora, groups: list[LinearGroup], mlp_act_bytes: int) -> float:
    """One pre-LN ViT encoder layer's saved bytes per token (CLIP, SigLIP); `mlp_act_bytes` per intermediate
    element: 6 for quick_gelu (its input, the sigmoid, fc2's input), 4 for a one-op GELU (its input, fc2's)."""
    adapted = list(dict.fromkeys(g.name for g in groups if lora is not None and targeted(g, lora.targets)))
    if not adapted:
        return 0.0
    h, i = v.hidden_size, v.intermediate_size
    b = 16 * h + mlp_act_bytes * i + 4 * v.num_attention_heads + 8 + 2 * lora.r * len(adapted)
    if lora.dropout > 0:
        b += sum(2 * i if n == "fc2" else 3 * h for n in adapted)
        if any(n in adapted for n in ("q_proj", "k_proj", "v_proj")):
            b += h
    return b


def checkpointed_bytes_per_token(v: VisionSpec, compute_bytes: int) -> int:
    return compute_bytes * v.hidden_size


def forward_transient_bytes(v: VisionSpec, images: float, compute_bytes: int) -> int:
    """Hidden states of every layer (+ embeddings), returned when LLaVA selects a middle layer."""
    vtok = tokens_per_image(v) * images
    return int((v.num_layers + 1) * vtok * v.hidden_size * compute_bytes)
