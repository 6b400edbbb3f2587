"""LLaVA-NeXT (LLaVA-1.6): LLaVA with "anyres" images (transformers `LlavaNextForConditionalGeneration`).

The processor picks, from `image_grid_pinpoints`, the resolution that keeps the most of the image and wastes
the least (transformers image_processing_utils.py select_best_resolution), cuts it into a grid of tower-size
crops and adds the whole image resized to one crop (the base). Every crop goes through the tower and the
projector (models/llava_next/modeling_llava_next.py image_size_to_num_patches, get_image_features). The
grid's features are then laid out as one (rows x cols) map, the padding the resize added is cut off again
(unpad_image), and the learned `image_newline` vector ends each row (pack_image_features). So per image:
  tower tokens     = crops x the tower's tokens per crop (CLIP: patches + CLS);
  projector tokens = crops x the features per crop (vision_feature_select_strategy "default" drops CLS);
  LLM tokens       = base features + unpadded rows x (unpadded cols + 1 newline)
e.g. 2,928 for ViT-L/14-336 at 672x672 (576 + 48 x 49); equal to LlavaNextProcessor's count
(processing_llava_next.py _get_number_of_features; tests/estimate/test_vlm_families.py).

Parameters: LLaVA's projector (llava.py) + `image_newline` (the LLM's hidden size), counted with the projector.
With no image size given, the plan takes the pinpoint whose image gives the most LLM tokens (what an image
at least that large costs; docs/estimate.md#model-families).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require, shown
from vramplan.estimate.families import LinearGroup
from vramplan.estimate.families import llava as _llava
from vramplan.estimate.families.llava import LlavaParts, read_parts, select_strategy

ROLE = "projector"
HF_MODEL_TYPES = ("llava_next",)
PROFILE_FIELDS = {"kind": (str, True, None)}
DEFAULT_SIZE_NOTE = "no --image-size or --dataset: the grid resolution with the most image tokens"
# LlavaNextConfig's default image_grid_pinpoints, (height, width)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class ProjectorSpec:
    """LLaVA-NeXT's projector, its image grid and its image_newline."""

    family: ClassVar[str] = "llava_next"
    kind: str  # "mlp2x_gelu"
    in_features: int
    out_features: int
    select_strategy: str = "default"
    grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    max_grid_patches: int = 0  # LLaVA-OneVision's anyres_max_N pooling (llava_onevision.py); 0 = none


SPEC = ProjectorSpec


def linear_groups(p: ProjectorSpec) -> list[LinearGroup]:
    return _llava.linear_groups(p)


def other_params(p: ProjectorSpec) -> dict[str, int]:
    return {"image_newline": p.out_features}


def saved_bytes_per_image_token(p: ProjectorSpec, compute_bytes: int) -> int:
    return _llava.saved_bytes_per_image_token(p, compute_bytes)


# --- image tokens --------------------------------------------------------------------------------------------
def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers image_processing_utils.py select_best_resolution, (height, width) in and out."""
    h0, w0 = size
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def _grid(p: ProjectorSpec, v, size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tower-size crops the best resolution is cut into (image_size_to_num_patches)."""
    h, w = select_best_resolution(size, p.grid_pinpoints)
    return math.ceil(h / v.image_size), math.ceil(w / v.image_size)


def _size(p: ProjectorSpec, v, image_size):
    return tuple(image_size) if image_size is not None else default_image_size(p, v)


def crops_per_image(p: ProjectorSpec, v, image_size) -> int:
    rows, cols = _grid(p, v, _size(p, v, image_size))
    return rows * cols + 1  # + the base image


def features_per_crop(p: ProjectorSpec, v) -> int:
    from vramplan.estimate.families import module_for

    return module_for(v).tokens_per_image(v) - (1 if p.select_strategy == "default" else 0)


def tower_tokens_per_image(p: ProjectorSpec, v, image_size) -> int:
    from vramplan.estimate.families import module_for

    return crops_per_image(p, v, image_size) * module_for(v).tokens_per_image(v)


def projector_tokens_per_image(p: ProjectorSpec, v, image_size) -> int:
    return crops_per_image(p, v, image_size) * features_per_crop(p, v)


def llm_tokens_per_image(p: ProjectorSpec, v, image_size) -> int:
    """Base features + the unpadded grid with one newline per row (pack_image_features)."""
    height, width = _size(p, v, image_size)
    rows, cols = _grid(p, v, (height, width))
    side = v.image_size // v.patch_size
    cur_h, cur_w = rows * side, cols * side
    if width / height > cur_w / cur_h:  # unpad_image: cut the rows (or columns) the resize padded
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    if p.max_grid_patches:  # LLaVA-OneVision anyres_max_N: bilinear downsampling of a large grid
        ratio = math.sqrt(cur_h * cur_w / (p.max_grid_patches * side**2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return features_per_crop(p, v) + cur_h * (cur_w + 1)


def default_image_size(p: ProjectorSpec, v) -> tuple[int, int]:
    """The pinpoint whose image gives the most LLM tokens (the first of equals)."""
    return max(p.grid_pinpoints, key=lambda s: llm_tokens_per_image(p, v, s))


# --- config.json -----------------------------------------------------------------------------------------
def read_pinpoints(cfg: dict, processor: dict | None, where: str, default) -> tuple[tuple[int, int], ...]:
    """image_grid_pinpoints of config.json (what the model splits by), else the processor's, else `default`."""
    pins = require(cfg, "image_grid_pinpoints", list, where, allow_none=True, default=None)
    if pins is None and isinstance(processor, dict) and isinstance(processor.get("image_grid_pinpoints"), list):
        pins = processor["image_grid_pinpoints"]
    if pins is None:
        return default
    ok = pins and all(isinstance(x, (list, tuple)) and len(x) == 2 and all(_llava._is_int(n) and n > 0 for n in x)
                      for x in pins)
    if not ok:
        raise ContractError(f"{where}: image_grid_pinpoints: must be a non-empty list of [height, width] pairs of "
                            f"positive integers, got {shown(pins)}")
    return tuple((int(h), int(w)) for h, w in pins)


def from_hf_config(cfg: dict, where: str, processor: dict | None = None) -> LlavaParts:
    """The parts of a `LlavaNextConfig`-shaped dict (LlavaNextConfig's defaults: Llama, CLIP ViT-L/14-336)."""
    text, vision, layer, image_token_added = read_parts(cfg, where, _llava.DEFAULT_VISION, "clip_vision_model")
    n_feat = len(layer) if isinstance(layer, list) else 1
    proj = ProjectorSpec("mlp2x_gelu", vision.hidden_size * n_feat, text.hidden_size, select_strategy(cfg, where),
                         read_pinpoints(cfg, processor, where, DEFAULT_PINPOINTS))
    check_grid(proj, vision, where)
    return LlavaParts(text, vision, proj, image_token_added)


def check_grid(p: ProjectorSpec, v, where: str) -> None:
    """The model reshapes each crop's features into a side x side map: a crop must be the tower's full grid."""
    side = v.image_size // v.patch_size
    if features_per_crop(p, v) != side * side:
        raise ValueError(f"vision_feature_select_strategy {p.select_strategy!r} leaves "
                         f"{features_per_crop(p, v)} features per crop, not the {side}x{side} grid "
                         f"pack_image_features reshapes (use \"default\" with a CLS tower, \"full\" without one)")
