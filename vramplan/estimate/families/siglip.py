"""The SigLIP vision tower (transformers `SiglipVisionModel`: pre-LN ViT, tanh-GELU MLP, biases everywhere,
no CLS token).

Parameters (models/siglip/modeling_siglip.py; exact on the meta device, tests/estimate/test_vlm_families.py): per
encoder layer q, k, v, out_proj 4*(D*D + D), fc1 D*I + I, fc2 I*D + D, two LayerNorms 2*2D; embeddings: the
patch conv C*p*p*D + D (with bias) + learned positions N*D (N patches, no CLS); post_layernorm 2D; with
`vision_use_head` the attention-pooling head `head`: probe D, nn.MultiheadAttention's in_proj 3D*D + 3D and
out_proj D*D + D, a LayerNorm 2D and an MLP fc1/fc2 like a layer's (LLaVA-OneVision builds no head).

Activations (docs/estimate.md#activations): CLIP's per-layer count (clip.py) with 4 B instead of 6 B per
intermediate element: the tanh GELU is one op that saves only its input (quick_gelu also saves its sigmoid).
Measured with saved_tensors_hooks on bf16 SigLIP layers as tests/estimate/test_activation_truth.py measures
CLIP: 16h + 4i + 4a + 8 + 2r per adapted Linear (+ CLIP's dropout terms), exact at h 64/96, i 128/256.
A frozen tower without adapters saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.estimate.families import LinearGroup
from vramplan.estimate.families import clip as _clip
from vramplan.estimate.families.clip import checkpointed_bytes_per_token, vit_layer_saved_bytes  # noqa: F401

ROLE = "vision"
HF_MODEL_TYPES = ("siglip_vision_model", "siglip")
PROFILE_FIELDS = {**_clip.PROFILE_FIELDS, "use_head": (bool, False, None)}
# transformers' SiglipVisionConfig defaults, for keys a config.json may omit
HF_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 224, "patch_size": 16, "num_channels": 3, "vision_use_head": True}


@dataclass(frozen=True)
class VisionSpec(_clip.VisionSpec):
    """A SigLIP ViT tower's config: CLIP's fields, no CLS, and the pooling head."""

    family: ClassVar[str] = "siglip"
    use_head: bool = True  # vision_use_head: the attention-pooling head holds weights

    @property
    def num_positions(self) -> int:
        return self.num_patches  # no CLS


SPEC = VisionSpec


def from_hf_config(cfg: dict, where: str, defaults: dict | None = None, feature_layer: int = -1,
                   prefix: str = "") -> VisionSpec:
    """VisionSpec from a `SiglipVisionConfig`-shaped dict (or a SiglipConfig holding `vision_config`)."""
    return _clip.read_vit_config(cfg, where, VisionSpec, "siglip", {**HF_DEFAULTS, **(defaults or {})},
                                 feature_layer, prefix, {"use_head": ("vision_use_head", bool)})


# --- parameters --------------------------------------------------------------------------------------------
def linear_groups(v: VisionSpec) -> list[LinearGroup]:
    """The encoder's Linears; the head's out_proj (an nn.Linear inside nn.MultiheadAttention) and MLP add one
    each to out_proj, fc1 and fc2 (PEFT matches them by the same names)."""
    d, i, L, head = v.hidden_size, v.intermediate_size, v.num_layers, int(v.use_head)
    return [LinearGroup("vision", n, d, d, True, L) for n in ("q_proj", "k_proj", "v_proj")] + \
           [LinearGroup("vision", "out_proj", d, d, True, L + head),
            LinearGroup("vision", "fc1", d, i, True, L + head), LinearGroup("vision", "fc2", i, d, True, L + head)]


def other_params(v: VisionSpec) -> dict[str, int]:
    """Embeddings (patch conv with bias, positions), LayerNorms, and the head's probe and in_proj."""
    d = v.hidden_size
    out = {"embeddings": v.num_channels * v.patch_size**2 * d + d + v.num_positions * d,
           "layer_norms": 2 * 2 * d * v.num_layers + 2 * d}  # layer_norm1/2 per layer, post_layernorm
    if v.use_head:
        out["head"] = d + 3 * d * d + 3 * d + 2 * d  # probe, in_proj weight + bias, layernorm
    return out


def largest_tensor_params(v: VisionSpec) -> int:
    sizes = [g.d_in * g.d_out for g in linear_groups(v)]
    head = [3 * v.hidden_size**2] if v.use_head else []
    return max(sizes + head + [v.num_channels * v.patch_size**2 * v.hidden_size, v.num_positions * v.hidden_size])


# --- tokens and activations --------------------------------------------------------------------------------
def tokens_per_image(v: VisionSpec) -> int:
    """Tokens the tower processes per crop: the patches (no CLS)."""
    return v.num_patches


def image_tokens(v: VisionSpec) -> int:
    return v.num_patches


def saved_bytes_per_token(v: VisionSpec, lora) -> float:
    """Saved bytes per token of one layer; 0 when the tower has no adapters (frozen, no grad)."""
    return vit_layer_saved_bytes(v, lora, linear_groups(v), mlp_act_bytes=4)


def forward_transient_bytes(v: VisionSpec, images: float, compute_bytes: int) -> int:
    """Hidden states of every layer (+ embeddings), returned when the VLM selects a layer's output."""
    return int((v.num_layers + 1) * tokens_per_image(v) * images * v.hidden_size * compute_bytes)
