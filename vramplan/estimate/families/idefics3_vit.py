"""The Idefics3 / SmolVLM vision transformer (transformers `Idefics3VisionTransformer`, `SmolVLMVisionTransformer`):
SigLIP's layers with NaViT-style position buckets (Dehghani et al. 2023, arXiv:2307.06304), run on image tiles.

Parameters (models/idefics3/modeling_idefics3.py; exact on the meta device, tests/estimate/
test_vlm_families_qwen_idefics.py): the patch Conv2d with bias C*p*p*D + D, the position embedding N*D for the
N = (image_size/p)**2 patches of a tile (no class token); per layer CLIP's Linears (q, k, v, out_proj D*D + D each,
fc1 D*I + I, fc2 I*D + D) and two LayerNorms 2*2D; post_layernorm 2D.

Tiles (models/idefics3/image_processing_idefics3.py): the image is resized so its longest edge is
size["longest_edge"] (at most 4096), then to multiples of the tile side T = max_image_size["longest_edge"]; an
image larger than one tile is cut into rows x cols tiles and followed by the whole image resized to T x T (the
global image); one that fits is a single T x T frame. Every frame is padded to T x T, so the tower runs
(T/p)**2 patches per frame. Without do_image_splitting each image is one T x T frame.

Activations (docs/estimate.md#activations): a frozen tower without adapters saves nothing. With LoRA, per patch
per layer (SDPA, 16-bit, measured with saved_tensors_hooks): 12h + 2i + 4a + 8 (two LayerNorm inputs and
their statistics, SDPA's q, k, v and output and fp32 logsumexp, the tanh-GELU's input) plus 2r per adapted
Linear and its input: 2*d_in, shared by q/k/v (the normed input), none for out_proj (it reads SDPA's saved
output), or 3*d_in each with lora_dropout > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from vramplan.estimate.families import clip, targeted

ROLE = "vision"
HF_MODEL_TYPES = ("idefics3_vision", "smolvlm_vision")
PROFILE_FIELDS = {
    **{k: clip.PROFILE_FIELDS[k] for k in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                           "image_size", "patch_size", "num_channels")},
    "longest_edge": (int, False, 1), "tile_size": (int, False, 1), "image_splitting": (bool, False, None),
    "resize": (bool, False, None), "scale_factor": (int, False, 1),
}
# Idefics3ImageProcessor / SmolVLMImageProcessor defaults (size, max_image_size)
LONGEST_EDGE, TILE = 4 * 364, 364
MAX_IMAGE_SIZE = 4096  # image_processing_idefics3.py: "4k resolution as absolute maximum"
DEFAULT_IMAGE_SIZE = (480, 640)  # as families/qwen2_vl_vit.py: COCO's typical 640x480


@dataclass(frozen=True)
class VisionSpec(clip.VisionSpec):
    """An Idefics3 / SmolVLM tower and the processor settings that decide its frames."""

    family: ClassVar[str] = "idefics3_vit"
    feature_layer: int = -1  # the last hidden state, after post_layernorm
    longest_edge: int = LONGEST_EDGE
    tile_size: int = TILE
    image_splitting: bool = True
    resize: bool = True
    scale_factor: int = 2  # the connector's pixel shuffle (image_seq_len = patches / scale_factor**2)

    @property
    def num_positions(self) -> int:
        return self.num_patches  # no class token

    @property
    def tile_patches(self) -> int:
        return (self.tile_size // self.patch_size) ** 2


SPEC = VisionSpec


def from_hf_config(cfg: dict, where: str, *args, **kwargs) -> VisionSpec:
    """Refused: this tower is read with its wrapper (families/idefics3.py), which also reads the processor config."""
    raise ValueError(f"a {cfg.get('model_type')} vision tower is read only from its own model's config.json "
                     "(model_type idefics3 or smolvlm)")


linear_groups = clip.linear_groups
largest_tensor_params = clip.largest_tensor_params
checkpointed_bytes_per_token = clip.checkpointed_bytes_per_token


def other_params(v: VisionSpec) -> dict[str, int]:
    """The patch Conv2d (with bias), the position embedding, the layers' LayerNorms and post_layernorm."""
    d = v.hidden_size
    return {"embeddings": v.num_channels * v.patch_size**2 * d + d + v.num_positions * d,
            "layer_norms": 2 * 2 * d * v.num_layers + 2 * d}


# --- tiles and tokens ------------------------------------------------------------------------------------------
def _longest_edge_to(height: int, width: int, side: int) -> tuple[int, int]:
    """_resize_output_size_rescale_to_max_len then _resize_output_size_scale_below_upper_bound."""
    aspect = width / height
    if width >= height:
        width, height = side, int(side / aspect)
        height += height % 2
    else:
        height, width = side, int(side * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tiles(v: VisionSpec, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) the processor cuts an image into; (0, 0) when it stays one frame."""
    if not v.image_splitting:
        return 0, 0
    height, width = image_size or DEFAULT_IMAGE_SIZE
    if v.resize:
        height, width = _longest_edge_to(height, width, v.longest_edge)
    t, aspect = v.tile_size, width / height
    if width >= height:  # resize_for_vision_encoder
        width = math.ceil(width / t) * t
        height = math.ceil(int(width / aspect) / t) * t
    else:
        height = math.ceil(height / t) * t
        width = math.ceil(int(height * aspect) / t) * t
    if height > t or width > t:
        return height // t, width // t
    return 0, 0


def frames(v: VisionSpec, image_size: tuple[int, int] | None = None) -> int:
    """Frames per image: the tiles and the global image, or one."""
    rows, cols = tiles(v, image_size)
    return rows * cols + 1 if rows else 1


def tokens_per_image(v: VisionSpec, image_size: tuple[int, int] | None = None) -> int:
    """Patches the tower runs per image: every frame padded to one tile."""
    return frames(v, image_size) * v.tile_patches


def image_tokens(v: VisionSpec, image_size: tuple[int, int] | None = None) -> int:
    """Features per image after the pixel shuffle (image_seq_len per frame)."""
    return frames(v, image_size) * (v.num_patches // v.scale_factor**2)


def attention_flops_per_token(v: VisionSpec, image_size: tuple[int, int] | None = None) -> float:
    """Forward FLOPs of the score and value GEMMs per patch and layer: each frame attends within itself."""
    return 4 * v.tile_patches * v.hidden_size


# --- activations ---------------------------------------------------------------------------------------------
READS = {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "out_proj": "attention", "fc1": "norm2",
         "fc2": "activation"}


def saved_bytes_per_token(v: VisionSpec, lora) -> float:
    adapted = [g for g in linear_groups(v) if lora is not None and targeted(g, lora.targets)]
    if not adapted:
        return 0.0
    h, i, a = v.hidden_size, v.intermediate_size, v.num_attention_heads
    b = 12 * h + 2 * i + 4 * a + 8 + 2 * lora.r * len(adapted)
    if lora.dropout > 0:
        return float(b + sum(3 * g.d_in for g in adapted))
    reads = {READS[g.name]: g.d_in for g in adapted if READS[g.name] != "attention"}
    return float(b + 2 * sum(reads.values()))


def forward_transient_bytes(v: VisionSpec, images: float, compute_bytes: int,
                            image_size: tuple[int, int] | None = None) -> int:
    """One layer's working set in a forward without grad (Idefics3 reads the last hidden state only): the
    residual and the normed input, then the larger of q, k, v and the output, or fc1's output and GELU's.
    Assumed from the module's ops, not measured."""
    h, i = v.hidden_size, v.intermediate_size
    per_token = compute_bytes * (2 * h + max(4 * h, 2 * i))
    return int(per_token * tokens_per_image(v, image_size) * images)
