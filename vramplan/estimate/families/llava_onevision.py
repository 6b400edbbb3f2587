"""LLaVA-OneVision: LLaVA-NeXT's anyres images on a SigLIP tower and a Qwen2 LLM, with a cap on the grid
(transformers `LlavaOnevisionForConditionalGeneration`, models/llava_onevision/modeling_llava_onevision.py).

Crops, tower and projector tokens and the unpadding are LLaVA-NeXT's (llava_next.py). The difference,
`vision_aspect_ratio` "anyres_max_N" (pack_image_features): when the unpadded grid holds more than N crops'
worth of features, ratio = sqrt(rows x cols / (N x side^2)) and, above 1.1, the map is resized bilinearly to
(rows // ratio) x (cols // ratio) before the newlines; LlavaOnevisionProcessor counts the same
(processing_llava_onevision.py _get_unpadded_features). The vision features are the whole last layer
(vision_feature_layer -1, strategy "full": SigLIP has no CLS), 729 per 384-pixel crop of SigLIP-so400m/14.
One image per sample: several images in one sample go through as one crop each (need_patching), not counted.

Parameters: LLaVA's projector + `image_newline`; LlavaOnevisionConfig's defaults (a Qwen2 text config, the
SigLIP-so400m-patch14-384 tower without its head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require, shown
from vramplan.estimate.families import llava_next as _next
from vramplan.estimate.families.llava import LlavaParts, read_parts, select_strategy
from vramplan.estimate.families.llava_next import (  # noqa: F401 (the family's functions: LLaVA-NeXT's)
    DEFAULT_SIZE_NOTE,
    default_image_size,
    linear_groups,
    llm_tokens_per_image,
    other_params,
    projector_tokens_per_image,
    saved_bytes_per_image_token,
    tower_tokens_per_image,
)

ROLE = "projector"
HF_MODEL_TYPES = ("llava_onevision",)
PROFILE_FIELDS = {"kind": (str, True, None)}
# LlavaOnevisionConfig's default vision_config (SigLIP-so400m-patch14-384, no head) and grid: 384 x (1..6)^2
DEFAULT_VISION = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "patch_size": 14, "image_size": 384, "num_hidden_layers": 26, "num_attention_heads": 16,
                  "vision_use_head": False}
DEFAULT_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
DEFAULT_IMAGE_TOKEN_INDEX = 151646  # LlavaOnevisionConfig.image_token_index
DEFAULT_ASPECT = "anyres_max_9"


@dataclass(frozen=True)
class ProjectorSpec(_next.ProjectorSpec):
    """LLaVA-OneVision's projector, grid, image_newline and anyres_max_N cap."""

    family: ClassVar[str] = "llava_onevision"


SPEC = ProjectorSpec


def max_grid_patches(cfg: dict, processor: dict | None, where: str) -> int:
    """N of `vision_aspect_ratio` "anyres_max_N" (config.json, else the processor's, else anyres_max_9)."""
    ar = require(cfg, "vision_aspect_ratio", str, where, allow_none=True, default=None)
    if ar is None and isinstance(processor, dict) and isinstance(processor.get("vision_aspect_ratio"), str):
        ar = processor["vision_aspect_ratio"]
    m = re.fullmatch(r"anyres_max_(\d+)", ar or DEFAULT_ASPECT)
    if not m or int(m.group(1)) < 1:
        raise ContractError(f"{where}: vision_aspect_ratio: must be anyres_max_N (N >= 1), as "
                            f"modeling_llava_onevision.py parses it, got {shown(ar)}")
    return int(m.group(1))


def from_hf_config(cfg: dict, where: str, processor: dict | None = None) -> LlavaParts:
    """The parts of a `LlavaOnevisionConfig`-shaped dict."""
    text, vision, layer, image_token_added = read_parts(cfg, where, DEFAULT_VISION, "siglip_vision_model",
                                                        default_text_type="qwen2", default_layer=-1,
                                                        image_index_default=DEFAULT_IMAGE_TOKEN_INDEX)
    n_feat = len(layer) if isinstance(layer, list) else 1
    proj = ProjectorSpec("mlp2x_gelu", vision.hidden_size * n_feat, text.hidden_size,
                         select_strategy(cfg, where, default="full"),
                         _next.read_pinpoints(cfg, processor, where, DEFAULT_PINPOINTS),
                         max_grid_patches(cfg, processor, where))
    _next.check_grid(proj, vision, where)
    return LlavaParts(text, vision, proj, image_token_added)
