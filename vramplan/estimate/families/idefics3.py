"""Idefics3 / SmolVLM (transformers `Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`): the
Idefics3 ViT on image tiles (families/idefics3_vit.py) -> the connector -> a decoder (Llama for both).

The connector (models/idefics3/modeling_idefics3.py Idefics3Connector) is this wrapper's projector: a pixel shuffle
that folds scale_factor x scale_factor neighbouring patches into one feature of D*s*s (no parameters), then
modality_projection, one Linear(D*s*s, h) without bias. A trained connector saves its Linear's input per image
token (measured, tests/estimate/test_vlm_families_qwen_idefics.py).

LLM tokens per image (models/idefics3/processing_idefics3.py replace_image_token, _get_num_multimodal_tokens):
image_seq_len = (image_size/p)**2 / s**2 <image> tokens per frame; a split image adds per tile
<fake_token_around_image> and <row_r_col_c>, a newline per row, and around the global image
<fake_token_around_image><global-img> ... <fake_token_around_image> (the row's newline and the one before the
global image tokenize as one "\\n\\n", as Llama-3's and SmolLM2's tokenizers do); a single frame takes
image_seq_len + 3. lm_head is tied only when the top level of config.json says tie_word_embeddings (the text
config's own flag is not what transformers reads for these wrappers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from vramplan.contract import ContractError, require
from vramplan.estimate.families import LinearGroup
from vramplan.estimate.families import idefics3_vit as vit
from vramplan.estimate.families.llava import LlavaParts
from vramplan.estimate.families.qwen2_vl import image_processor_fields

ROLE = "projector"
HF_MODEL_TYPES = ("idefics3", "smolvlm")
PROFILE_FIELDS = {"in_features": (int, True, 1), "out_features": (int, True, 1)}
# Idefics3VisionConfig / SmolVLMVisionConfig defaults
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 224, "patch_size": 32}
DEFAULT_IMAGE_TOKEN_ID = 128257
AROUND_FRAME = 2  # <fake_token_around_image> + <row_r_col_c> before a tile's image tokens
AROUND_GLOBAL = 3  # <fake_token_around_image><global-img> ... <fake_token_around_image>


@dataclass(frozen=True)
class ProjectorSpec:
    """The connector's modality_projection."""

    family: ClassVar[str] = "idefics3"
    in_features: int  # vision hidden_size * scale_factor**2
    out_features: int  # the LLM's hidden size


SPEC = ProjectorSpec


def linear_groups(p: ProjectorSpec) -> list[LinearGroup]:
    return [LinearGroup("projector", "proj", p.in_features, p.out_features, False, 1)]


def other_params(p: ProjectorSpec) -> dict[str, int]:
    return {}


def saved_bytes_per_image_token(p: ProjectorSpec, compute_bytes: int) -> int:
    return p.in_features * compute_bytes


def tower_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None = None) -> int:
    return vit.tokens_per_image(v, image_size)


def projector_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None = None) -> int:
    """Features the connector maps: image_seq_len per frame (the LLM's tile markers are text embeddings)."""
    return vit.image_tokens(v, image_size)


def default_image_size(p: ProjectorSpec, v) -> tuple[int, int]:
    """Tokens follow the aspect ratio (every image is resized to the longest edge): idefics3_vit.DEFAULT_IMAGE_SIZE."""
    return vit.DEFAULT_IMAGE_SIZE


def llm_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None = None) -> int:
    """The image's tokens in the LLM sequence: <image> tokens and the tile markers around them."""
    seq = v.num_patches // v.scale_factor**2
    rows, cols = vit.tiles(v, image_size)
    return seq + AROUND_GLOBAL + rows * (cols * (seq + AROUND_FRAME) + 1)


def from_hf_config(cfg: dict, where: str, processor: dict | None = None) -> LlavaParts:
    """The parts of an `Idefics3Config` / `SmolVLMConfig`-shaped dict and its processor config."""
    from vramplan.estimate.families import for_model_type, known_model_types

    require(cfg, "model_type", str, where, choices=HF_MODEL_TYPES)
    tc = require(cfg, "text_config", dict, where, allow_none=True, default=None) or {}
    text_type = require(tc, "model_type", str, where, label="text_config.model_type", allow_none=True,
                        default=None) or "llama"
    text_mod = for_model_type("text", text_type)
    if text_mod is None:
        raise ValueError(f"language model type {text_type!r} is not supported "
                         f"(known: {', '.join(known_model_types('text'))})")
    text = text_mod.from_hf_config(tc, where, prefix="text_config.")
    tie = require(cfg, "tie_word_embeddings", bool, where, allow_none=True, default=None)
    text = replace(text, tie_word_embeddings=bool(tie))
    scale = require(cfg, "scale_factor", int, where, min=1, allow_none=True, default=None) or 2
    vision = _vision(cfg, where, processor, scale)
    image_id = require(cfg, "image_token_id", int, where, allow_none=True, default=None)
    image_id = DEFAULT_IMAGE_TOKEN_ID if image_id is None else image_id
    proj = ProjectorSpec(vision.hidden_size * scale**2, text.hidden_size)
    return LlavaParts(text, vision, proj, 0 <= image_id < text.vocab_size)


def _vision(cfg: dict, where: str, processor: dict | None, scale: int) -> vit.VisionSpec:
    vc = require(cfg, "vision_config", dict, where, allow_none=True, default=None) or {}

    def get(key):
        v = require(vc, key, int, where, label="vision_config." + key, min=1, allow_none=True, default=None)
        return VISION_DEFAULTS[key] if v is None else v

    ip, label = image_processor_fields(processor), f"{where} (processor config)"

    def edge(key, default):
        table = require(ip, key, dict, label, allow_none=True, default=None) or {}
        v = require(table, "longest_edge", int, label, label=key + ".longest_edge", min=1, allow_none=True,
                    default=None)
        return default if v is None else v

    def flag(key):
        v = require(ip, key, bool, label, allow_none=True, default=None)
        return True if v is None else v

    spec = vit.VisionSpec(num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
                          intermediate_size=get("intermediate_size"), num_attention_heads=get("num_attention_heads"),
                          image_size=get("image_size"), patch_size=get("patch_size"), num_channels=get("num_channels"),
                          longest_edge=edge("size", vit.LONGEST_EDGE), tile_size=edge("max_image_size", vit.TILE),
                          image_splitting=flag("do_image_splitting"), resize=flag("do_resize"), scale_factor=scale)
    side = spec.image_size // spec.patch_size
    if spec.patch_size > spec.image_size or side % scale:
        raise ContractError(f"{where}: scale_factor: {scale} does not divide the {side} patches a side of "
                            f"vision_config.image_size {spec.image_size} / patch_size {spec.patch_size}")
    if spec.hidden_size % spec.num_attention_heads:
        raise ContractError(f"{where}: vision_config.hidden_size: {spec.hidden_size} is not a multiple of "
                            f"num_attention_heads {spec.num_attention_heads}")
    return spec
