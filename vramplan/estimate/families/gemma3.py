"""Gemma 3 with images (model_type "gemma3", Gemma 3 4B-27B): a SigLIP tower -> an average pool and a projection ->
the Gemma 3 text model (transformers `Gemma3ForConditionalGeneration`, models/gemma3/modeling_gemma3.py).

Projector (Gemma3MultiModalProjector): the tower's last layer, every patch ((image_size / patch)^2: 4,096 at
896 px, patch 14), average-pooled to `mm_tokens_per_image` (256) tokens, normalised by a Gemma RMSNorm of the
vision width D (`mm_soft_emb_norm`, fp32, (1 + w)), projected by a bare weight `mm_input_projection_weight`
(D x h, an nn.Parameter used with torch.matmul: not an nn.Linear, so PEFT's all-linear leaves it alone). An
image takes mm_tokens_per_image places in the LLM's sequence; the processor's `<start_of_image>`/`<end_of_image>`
markers around them are text. Every image is resized to the tower's size; pan-and-scan crops (the processor's
`do_pan_and_scan`, off by default) are not counted.

A trained projector with a frozen tower saves per image token the norm's fp32 normalised value (4D, for the
weight's gradient) and the 16-bit projection input (D x compute bytes); with a trained tower the pool's input
(16 patches per token) and the norm's fp32 input are kept as well (not counted here).

The text model is families/gemma.py's (model_type gemma3_text); the defaults of a config.json without a
vision_config or text_config are SiglipVisionConfig's and Gemma3TextConfig's (configuration_gemma3.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import require
from vramplan.estimate.families.llava import LlavaParts

ROLE = "projector"
HF_MODEL_TYPES = ("gemma3",)
IMAGE_SIZE_MATTERS = False  # every image is resized to the tower's size
MASK_IN_TRAINING = True  # token_type_ids: an explicit SDPA mask in every layer, as families/paligemma.py says
PROFILE_FIELDS = {"kind": (str, True, None)}
DEFAULT_VISION = {"model_type": "siglip_vision_model"}  # SiglipVisionConfig's own defaults
DEFAULT_IMAGE_TOKEN_INDEX = 262144  # Gemma3Config.image_token_index
DEFAULT_MM_TOKENS = 256  # Gemma3Config.mm_tokens_per_image


@dataclass(frozen=True)
class ProjectorSpec:
    """Gemma 3's pooling projector."""

    family: ClassVar[str] = "gemma3"
    kind: str  # "pool_norm_proj"
    in_features: int
    out_features: int
    tokens_per_image: int = DEFAULT_MM_TOKENS  # mm_tokens_per_image


SPEC = ProjectorSpec


def from_hf_config(cfg: dict, where: str, processor: dict | None = None) -> LlavaParts:
    """The parts of a `Gemma3Config`-shaped dict; `processor` changes nothing (fixed-size images)."""
    from vramplan.estimate.families.llava import read_parts  # the VLM seam's reader (text + vision families)

    if cfg.get("text_config") is None:
        cfg = {**cfg, "text_config": {"model_type": "gemma3_text"}}
    text, vision, _, image_token_added = read_parts(cfg, where, DEFAULT_VISION, "siglip_vision_model",
                                                     default_text_type="gemma3_text", default_layer=-1,
                                                     image_index_default=DEFAULT_IMAGE_TOKEN_INDEX)
    tokens = require(cfg, "mm_tokens_per_image", int, where, min=1, allow_none=True, default=None) or \
        DEFAULT_MM_TOKENS
    side, per_side = vision.image_size // vision.patch_size, round(tokens ** 0.5)
    if per_side * per_side != tokens or side % per_side:
        raise ValueError(f"mm_tokens_per_image {tokens} is not a square grid that divides the tower's "
                         f"{side} x {side} patches (Gemma3MultiModalProjector pools by whole kernels)")
    return LlavaParts(text, vision, ProjectorSpec("pool_norm_proj", vision.hidden_size, text.hidden_size, tokens),
                      image_token_added)


def linear_groups(p: ProjectorSpec) -> list:
    return []  # the projection is a bare weight, not an nn.Linear


def other_params(p: ProjectorSpec) -> dict[str, int]:
    return {"mm_input_projection_weight": p.in_features * p.out_features, "mm_soft_emb_norm": p.in_features}


def largest_tensor_params(p: ProjectorSpec) -> int:
    return p.in_features * p.out_features


def saved_bytes_per_image_token(p: ProjectorSpec, compute_bytes: int) -> int:
    """A trained projector on a frozen tower: the norm's fp32 normalised value and the projection's input."""
    return (4 + compute_bytes) * p.in_features


def tower_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None) -> int:
    """The tower's patches at its fixed size; `image_size` does not change it."""
    from vramplan.estimate.families import module_for

    return module_for(v).tokens_per_image(v)


def llm_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None) -> int:
    """The pooled tokens (mm_tokens_per_image)."""
    return p.tokens_per_image


def default_image_size(p: ProjectorSpec, v) -> tuple[int, int]:
    return (v.image_size, v.image_size)
