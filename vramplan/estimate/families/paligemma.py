"""PaliGemma 1 and 2: a SigLIP tower -> one Linear -> a Gemma (or Gemma 2) decoder (transformers
`PaliGemmaForConditionalGeneration`, models/paligemma/modeling_paligemma.py).

Projector: `multi_modal_projector.linear` = Linear(vision hidden, projection_dim) with bias, projection_dim the
text hidden size; the image features are then scaled by 1/sqrt(hidden) (a scalar multiply: no parameter, nothing
saved). A trained projector saves its input per image token. The tower's output is its whole last layer
(`last_hidden_state`, post-LayerNorm), every patch: the processor resizes every image to the tower's size, so an
image takes (image_size / patch_size)^2 tokens in the tower and in the LLM's sequence (256 at 224 px, 1024 at
448 px; PaliGemmaConfig sets text_config.num_image_tokens the same way, configuration_paligemma.py).

The text model is families/gemma.py's (lm_head tied to its embeddings). PaliGemma attends bidirectionally over
the image and the prompt (token_type_ids in training), so SDPA takes an explicit mask in every layer: 2 B per
query-key pair per layer (MASK_IN_TRAINING; PaliGemma 2's Gemma 2 runs eager: nothing).

A config.json without a vision_config or text_config takes PaliGemmaConfig's sub-config defaults (SigLIP
So400m/14 at 224 px without its head; Gemma-2B: 18 layers, hidden 2048, one kv head, 257,152 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import require
from vramplan.estimate.families import LinearGroup
from vramplan.estimate.families.llava import LlavaParts

ROLE = "projector"
HF_MODEL_TYPES = ("paligemma",)
IMAGE_SIZE_MATTERS = False  # every image is resized to the tower's size
# training passes token_type_ids (the processor makes them), and the image (and prompt) attend both ways:
# PaliGemmaForConditionalGeneration builds an explicit mask for every layer, padded or not, which SDPA keeps per layer
# (activations.py padding_mask_bytes_per_token; measured in tests/estimate/test_padding_mask.py)
MASK_IN_TRAINING = True
PROFILE_FIELDS = {"kind": (str, True, None)}
DEFAULT_VISION = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4096,
                  "patch_size": 14, "image_size": 224, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "vision_use_head": False}
DEFAULT_TEXT = {"model_type": "gemma", "hidden_size": 2048, "num_hidden_layers": 18, "intermediate_size": 16384,
                "num_attention_heads": 8, "num_key_value_heads": 1, "vocab_size": 257152}
DEFAULT_IMAGE_TOKEN_INDEX = 256000  # PaliGemmaConfig.image_token_index


@dataclass(frozen=True)
class ProjectorSpec:
    """PaliGemma's one-Linear projector."""

    family: ClassVar[str] = "paligemma"
    kind: str  # "linear"
    in_features: int
    out_features: int


SPEC = ProjectorSpec


def from_hf_config(cfg: dict, where: str, processor: dict | None = None) -> LlavaParts:
    """The parts of a `PaliGemmaConfig`-shaped dict; `processor` changes nothing (fixed-size images)."""
    from vramplan.estimate.families.llava import read_parts  # the VLM seam's reader (text + vision families)

    if cfg.get("text_config") is None:
        cfg = {**cfg, "text_config": DEFAULT_TEXT}
    text, vision, _, image_token_added = read_parts(cfg, where, DEFAULT_VISION, "siglip_vision_model",
                                                     default_text_type="gemma", default_layer=-1,
                                                     image_index_default=DEFAULT_IMAGE_TOKEN_INDEX)
    out = require(cfg, "projection_dim", int, where, min=1, allow_none=True, default=None) or text.hidden_size
    if out != text.hidden_size:
        raise ValueError(f"projection_dim {out} differs from the text model's hidden_size {text.hidden_size} "
                         "(PaliGemma's projector feeds the LLM's embeddings)")
    return LlavaParts(text, vision, ProjectorSpec("linear", vision.hidden_size, out), image_token_added)


def linear_groups(p: ProjectorSpec) -> list[LinearGroup]:
    return [LinearGroup("projector", "linear", p.in_features, p.out_features, True, 1)]


def other_params(p: ProjectorSpec) -> dict[str, int]:
    return {}


def saved_bytes_per_image_token(p: ProjectorSpec, compute_bytes: int) -> int:
    """A trained Linear keeps its input for its weight's gradient."""
    return p.in_features * compute_bytes


def tower_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None) -> int:
    """The tower's patches at its fixed size; `image_size` does not change it."""
    from vramplan.estimate.families import module_for

    return module_for(v).tokens_per_image(v)


def llm_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None) -> int:
    """Every patch's feature takes a place in the sequence (PaliGemmaProcessor repeats <image> that often)."""
    return tower_tokens_per_image(p, v, image_size)


def default_image_size(p: ProjectorSpec, v) -> tuple[int, int]:
    return (v.image_size, v.image_size)
