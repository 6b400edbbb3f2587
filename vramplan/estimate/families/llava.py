"""LLaVA: a vision tower's features -> an MLP projector -> a decoder LLM (transformers `LlavaForConditionalGeneration`).

Projector `mlp2x_gelu` (models/llava/modeling_llava.py LlavaMultiModalProjector; LLaVA's builder.py):
Linear(d_v, h) -> GELU -> Linear(h, h), both with bias: d_v*h + h + h*h + h parameters; `linear`: one Linear.
A trained projector saves, per image token, its Linear(d_v, h) input, the GELU input and the Linear(h, h)
input (docs/estimate.md#activations).

The config reader composes the text and vision families named by `text_config.model_type` and
`vision_config.model_type`, with LlavaConfig's defaults (a Llama text config, CLIP ViT-L/14-336).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require, shown
from vramplan.estimate.families import LinearGroup

ROLE = "projector"
HF_MODEL_TYPES = ("llava",)
IMAGE_SIZE_MATTERS = False  # every image is resized to the tower's size
PROFILE_FIELDS = {"kind": (str, True, None)}
KINDS = ("mlp2x_gelu", "linear")
GELU_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu")
# LlavaConfig's default vision_config when config.json has none (CLIP ViT-L/14-336)
DEFAULT_VISION = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                  "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
DEFAULT_IMAGE_TOKEN_INDEX = 32000  # LlavaConfig.image_token_index


@dataclass(frozen=True)
class ProjectorSpec:
    """LLaVA's projector."""

    family: ClassVar[str] = "llava"
    kind: str  # "mlp2x_gelu" | "linear"
    in_features: int
    out_features: int
    select_strategy: str = "default"  # vision_feature_select_strategy: "default" drops the tower's first token


SPEC = ProjectorSpec  # the family's config dataclass (profiles build it from their table)


def linear_groups(p: ProjectorSpec) -> list[LinearGroup]:
    first = LinearGroup("projector", "linear_1", p.in_features, p.out_features, True, 1)
    if p.kind == "linear":
        return [first]
    return [first, LinearGroup("projector", "linear_2", p.out_features, p.out_features, True, 1)]


def other_params(p: ProjectorSpec) -> dict[str, int]:
    return {}


def saved_bytes_per_image_token(p: ProjectorSpec, compute_bytes: int) -> int:
    return (p.in_features + 2 * p.out_features) * compute_bytes


# --- image tokens (the seam: vramplan/estimate/families/__init__.py) --------------------------------------
def tower_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None) -> int:
    """One crop at the tower's fixed size (the processor resizes and center-crops every image to it):
    CLIP's patches + CLS, SigLIP's patches. `image_size` does not change it."""
    from vramplan.estimate.families import module_for

    return module_for(v).tokens_per_image(v)


def llm_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None) -> int:
    """The tower's tokens less the first with vision_feature_select_strategy "default" (LLaVA-1.5 drops CLS:
    576 for ViT-L/14-336); all of them with "full" (models/llava/modeling_llava.py get_image_features)."""
    return tower_tokens_per_image(p, v, image_size) - (1 if p.select_strategy == "default" else 0)


def default_image_size(p: ProjectorSpec, v) -> tuple[int, int]:
    return (v.image_size, v.image_size)


@dataclass(frozen=True)
class LlavaParts:
    """What a LLaVA config.json describes, for vramplan.inputs.model_dir."""

    text: object
    vision: object
    projector: ProjectorSpec
    image_token_added: bool  # the <image> token id lies inside the text vocabulary (HF LLaVA adds it)


def from_hf_config(cfg: dict, where: str, processor: dict | None = None) -> LlavaParts:
    """The parts of a `LlavaConfig`-shaped dict. Raises ValueError naming what is not supported.
    `processor` (preprocessor_config.json) changes nothing: every image is resized to the tower's size."""
    text, vision, layer, image_token_added = read_parts(cfg, where, DEFAULT_VISION, "clip_vision_model")
    n_feat = len(layer) if isinstance(layer, list) else 1  # several selected layers are concatenated
    proj = ProjectorSpec("mlp2x_gelu", vision.hidden_size * n_feat, text.hidden_size, select_strategy(cfg, where))
    return LlavaParts(text, vision, proj, image_token_added)


def select_strategy(cfg: dict, where: str, default: str = "default") -> str:
    s = require(cfg, "vision_feature_select_strategy", str, where, allow_none=True, default=None) or default
    if s not in ("default", "full"):
        raise ContractError(f"{where}: vision_feature_select_strategy: must be default or full, got {shown(s)}")
    return s


def read_parts(cfg: dict, where: str, default_vision: dict, default_vision_type: str, default_text_type: str = "llama",
               default_layer: int = -2, image_index_default: int = DEFAULT_IMAGE_TOKEN_INDEX):
    """(text spec, vision spec, vision_feature_layer, image token inside the vocab) of a LLaVA-like config:
    the text and vision families named by `text_config.model_type` and `vision_config.model_type`, the
    projector checks (biases, a GELU). Shared by llava_next.py and llava_onevision.py."""
    from vramplan.estimate.families import for_model_type, known_model_types

    def opt(obj, key, kind, default, label=None):
        v = require(obj, key, kind, where, label=label, allow_none=True, default=None)
        return default if v is None else v

    tc = opt(cfg, "text_config", dict, {})
    text_type = opt(tc, "model_type", str, default_text_type, "text_config.model_type")
    text_mod = for_model_type("text", text_type)
    if text_mod is None:
        raise ValueError(f"language model type {text_type!r} is not supported "
                         f"(known: {', '.join(known_model_types('text'))})")
    vc = opt(cfg, "vision_config", dict, None)
    defaults = None
    if vc is None:
        vc, defaults = default_vision, default_vision
    vision_type = opt(vc, "model_type", str, default_vision_type, "vision_config.model_type")
    vision_mod = for_model_type("vision", vision_type)
    if vision_mod is None:
        raise ValueError(f"vision tower type {vision_type!r} is not supported "
                         f"(known: {', '.join(known_model_types('vision'))})")
    if opt(cfg, "multimodal_projector_bias", bool, True) is False:
        raise ValueError("a LLaVA projector without biases is not supported (vramplan models mlp2x_gelu: "
                         "Linear with bias, GELU, Linear with bias)")
    if opt(cfg, "projector_hidden_act", str, "gelu") not in GELU_ACTS:
        raise ValueError(f"projector_hidden_act {cfg['projector_hidden_act']!r} is not supported "
                         "(vramplan models LLaVA's mlp2x_gelu projector)")
    layer = opt(cfg, "vision_feature_layer", (int, list), default_layer)
    if isinstance(layer, list) and not (layer and all(_is_int(x) for x in layer)):
        raise ContractError(f"{where}: vision_feature_layer: must be an integer or a non-empty list of integers, "
                            f"got {shown(layer)}")
    fl = layer[-1] if isinstance(layer, list) else layer
    text = text_mod.from_hf_config(tc, where, prefix="text_config." if tc is not cfg else "")
    hf_defaults = {k: v for k, v in (defaults or {}).items() if k != "model_type"}
    vision = vision_mod.from_hf_config(vc, where, hf_defaults, fl, prefix="vision_config." if defaults is None else "")
    image_index = opt(cfg, "image_token_index", int, None)
    if image_index is None:
        image_index = opt(cfg, "image_token_id", int, image_index_default)
    return text, vision, layer, 0 <= image_index < text.vocab_size


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
