"""The Qwen2-VL / Qwen2.5-VL vision transformer (transformers `Qwen2VisionTransformerPretrainedModel`,
`Qwen2_5_VisionTransformerPretrainedModel`): native-resolution patches, 2D rotary positions, no class token.

Parameters (models/qwen2_vl/modeling_qwen2_vl.py, models/qwen2_5_vl/modeling_qwen2_5_vl.py; exact on the meta
device, tests/estimate/test_vlm_families_qwen_idefics.py): the patch embedding is a Conv3d without bias over
temporal_patch_size x patch_size x patch_size pixels, C*T*p*p*D; per block a fused `qkv` Linear(D, 3D) and `proj`
Linear(D, D), both with bias, and
  Qwen2-VL:   two LayerNorms (2*2D) and the MLP fc1 Linear(D, I), fc2 Linear(I, D) with biases, I = D*mlp_ratio;
  Qwen2.5-VL: two RMSNorms (2*D) and a SwiGLU MLP gate_proj, up_proj Linear(D, I), down_proj Linear(I, D), all
              with biases.
The PatchMerger (`merger`, the 2x2 spatial merge into the LLM's width) is the projector: families/qwen2_vl.py.

Tokens (models/qwen2_vl/image_processing_qwen2_vl.py smart_resize): an image is resized to a multiple of
factor = patch_size * merge_size on each side with min_pixels <= h*w <= max_pixels, keeping its aspect ratio;
the tower sees (h/p)*(w/p) patches (one temporal patch: a still image is repeated temporal_patch_size times),
the LLM 1/merge_size**2 of them. Qwen2.5-VL attends within windows of window_size pixels
(window_size/(merge*p) merged units a side) except in the fullatt_block_indexes blocks.

Activations (docs/estimate.md#activations): a frozen tower without adapters saves nothing. With LoRA, per
patch per block, counted op by op and measured with saved_tensors_hooks: saved_bytes_per_token.
LoRA target "proj" also matches the Conv3d patch_embed.proj in PEFT; "attn.proj" names the Linear alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError
from vramplan.estimate.families import LinearGroup, targeted

ROLE = "vision"
HF_MODEL_TYPES = ("qwen2_vl_vision", "qwen2_5_vl_vision")
PROFILE_FIELDS = {
    "num_layers": (int, True, 1), "hidden_size": (int, True, 1), "intermediate_size": (int, True, 1),
    "num_attention_heads": (int, True, 1), "swiglu": (bool, False, None), "patch_size": (int, False, 1),
    "temporal_patch_size": (int, False, 1), "merge_size": (int, False, 1), "num_channels": (int, False, 1),
    "window_size": (int, False, 0), "full_attention_blocks": (int, False, 0), "min_pixels": (int, False, 1),
    "max_pixels": (int, False, 1),
}
# Qwen2VLImageProcessor's bounds (image_processing_qwen2_vl.py: size shortest_edge / longest_edge)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
# An image size for when none is stated: Qwen2-VL's processor keeps an image's own resolution, so it has no
# default size. COCO's typical 640x480 (Lin et al. 2014, arXiv:1405.0312), the images of LLaVA-Instruct.
DEFAULT_IMAGE_SIZE = (480, 640)  # (height, width)
MAX_ASPECT = 200  # smart_resize refuses a longer side over 200 times the shorter


@dataclass(frozen=True)
class VisionSpec:
    """A Qwen2-VL / Qwen2.5-VL ViT's config and its processor's resolution bounds."""

    family: ClassVar[str] = "qwen2_vl_vit"
    num_layers: int
    hidden_size: int  # the ViT width (Qwen2-VL's embed_dim)
    intermediate_size: int
    num_attention_heads: int
    swiglu: bool = False  # Qwen2.5-VL: RMSNorm + SwiGLU MLP; Qwen2-VL: LayerNorm + fc1/fc2
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    num_channels: int = 3
    window_size: int = 0  # pixels a side of an attention window (Qwen2.5-VL); 0: full attention everywhere
    full_attention_blocks: int = 0  # blocks with full attention when windowed (fullatt_block_indexes)
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


SPEC = VisionSpec


def from_hf_config(cfg: dict, where: str, *args, **kwargs) -> VisionSpec:
    """Refused: this tower is read with its wrapper (families/qwen2_vl.py), which also reads the processor config."""
    raise ValueError(f"a {cfg.get('model_type')} vision tower is read only from its own model's config.json "
                     "(model_type qwen2_vl or qwen2_5_vl)")


# --- parameters --------------------------------------------------------------------------------------------
def linear_groups(v: VisionSpec) -> list[LinearGroup]:
    d, i, L = v.hidden_size, v.intermediate_size, v.num_layers
    attn = [LinearGroup("vision", "qkv", d, 3 * d, True, L), LinearGroup("vision", "proj", d, d, True, L)]
    if v.swiglu:
        return attn + [LinearGroup("vision", n, d, i, True, L) for n in ("gate_proj", "up_proj")] + \
                      [LinearGroup("vision", "down_proj", i, d, True, L)]
    return attn + [LinearGroup("vision", "fc1", d, i, True, L), LinearGroup("vision", "fc2", i, d, True, L)]


def _patch_embed(v: VisionSpec) -> int:
    return v.num_channels * v.temporal_patch_size * v.patch_size**2 * v.hidden_size


def other_params(v: VisionSpec) -> dict[str, int]:
    """The Conv3d patch embedding and the blocks' norms (LayerNorm weight + bias, or RMSNorm weight)."""
    per_norm = v.hidden_size if v.swiglu else 2 * v.hidden_size
    return {"embeddings": _patch_embed(v), "layer_norms": 2 * per_norm * v.num_layers}


def largest_tensor_params(v: VisionSpec) -> int:
    return max([g.d_in * g.d_out for g in linear_groups(v)] + [_patch_embed(v)])


# --- tokens --------------------------------------------------------------------------------------------------
def resized(v: VisionSpec, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) after Qwen2VLImageProcessor's smart_resize (image_processing_qwen2_vl.py)."""
    height, width = image_size or DEFAULT_IMAGE_SIZE
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ContractError(f"image size {height}x{width}: the Qwen2-VL processor refuses an aspect ratio over "
                            f"{MAX_ASPECT}")
    f = v.factor
    h_bar, w_bar = round(height / f) * f, round(width / f) * f
    if h_bar * w_bar > v.max_pixels:
        beta = math.sqrt(height * width / v.max_pixels)
        h_bar, w_bar = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < v.min_pixels:
        beta = math.sqrt(v.min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h_bar, w_bar


def grid(v: VisionSpec, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Patches down and across (image_grid_thw's h and w)."""
    h, w = resized(v, image_size)
    return h // v.patch_size, w // v.patch_size


def tokens_per_image(v: VisionSpec, image_size: tuple[int, int] | None = None) -> int:
    """Patches the tower processes for one image (grid_t = 1)."""
    gh, gw = grid(v, image_size)
    return gh * gw


def image_tokens(v: VisionSpec, image_size: tuple[int, int] | None = None) -> int:
    """Merged tokens the image takes in the LLM (the processor's <|image_pad|> count)."""
    return tokens_per_image(v, image_size) // v.merge_size**2


def attention_span(v: VisionSpec, image_size: tuple[int, int] | None = None) -> float:
    """Keys per query, averaged over the blocks: the image's patches in full-attention blocks, its window's in
    windowed ones (vision_utils.py get_vision_window_index: windows of window_size/(merge*p) merged units)."""
    gh, gw = grid(v, image_size)
    n = gh * gw
    if not v.window_size:
        return float(n)
    unit = v.merge_size**2
    ws = max(1, v.window_size // v.merge_size // v.patch_size)
    mh, mw = gh // v.merge_size, gw // v.merge_size
    rows = [ws] * (mh // ws) + ([mh % ws] if mh % ws else [])
    cols = [ws] * (mw // ws) + ([mw % ws] if mw % ws else [])
    windowed = sum((r * c * unit) ** 2 for r in rows for c in cols) / n
    full = min(v.full_attention_blocks, v.num_layers)
    return (full * n + (v.num_layers - full) * windowed) / v.num_layers


def attention_flops_per_token(v: VisionSpec, image_size: tuple[int, int] | None = None) -> float:
    """Forward FLOPs of the score and value GEMMs per patch and layer: 2*span*D each."""
    return 4 * attention_span(v, image_size) * v.hidden_size


# --- activations ---------------------------------------------------------------------------------------------
# The tensor each adapted Linear reads: adapters reading the same tensor share one saved copy (no dropout)
READS = {"qkv": "norm1", "proj": "attention", "fc1": "norm2", "gate_proj": "norm2", "up_proj": "norm2",
         "fc2": "activation", "down_proj": "activation"}


def saved_bytes_per_token(v: VisionSpec, lora) -> float:
    """Saved bytes per patch of one block (16-bit compute, SDPA); 0 when the tower has no adapters.

    With adapters, gradients flow through every block: its two norms save their input (LayerNorm: the input
    and 4 B of statistics; RMSNorm: the fp32 upcast and its 4 B rstd), SDPA saves the rotated q and k, v (a view
    that keeps the whole qkv output, 3h), its output and the fp32 logsumexp (4 B a head); the MLP saves fc1's
    output and the activation's sigmoid (quick_gelu, 4i) or the gate, SiLU output and up (SwiGLU, 6i).
    Qwen2-VL 16h + 4i + 4a + 8, Qwen2.5-VL 20h + 6i + 4a + 8, plus per adapted Linear 2r (the A output) and its
    input: 2*d_in, shared by adapters that read the same tensor, or 3*d_in each with lora_dropout > 0 (the
    dropped copy and its 1-byte mask). Measured (tests/estimate/test_vlm_families_qwen_idefics.py). Once per tower,
    not per block, the rotary cos/sin tables (fp32, 8*d_head B per patch) are saved too: not counted."""
    adapted = [g for g in linear_groups(v) if lora is not None and targeted(g, lora.targets)]
    if not adapted:
        return 0.0
    h, i, a = v.hidden_size, v.intermediate_size, v.num_attention_heads
    norms = 2 * (4 * h + 4) if v.swiglu else 2 * (2 * h + 4)
    attention = 6 * h + 4 * h + 2 * h + 4 * a  # qkv output, rotated q and k, SDPA output, logsumexp
    mlp = 6 * i if v.swiglu else 4 * i
    if lora.dropout > 0:
        inputs = sum(3 * g.d_in for g in adapted)
    else:
        inputs = 2 * sum({READS[g.name]: g.d_in for g in adapted}.values())
    return float(norms + attention + mlp + inputs + 2 * lora.r * len(adapted))


def checkpointed_bytes_per_token(v: VisionSpec, compute_bytes: int) -> int:
    return compute_bytes * v.hidden_size


def forward_transient_bytes(v: VisionSpec, images: float, compute_bytes: int,
                            image_size: tuple[int, int] | None = None) -> int:
    """One block's working set in a forward without grad (the tower returns its last hidden state only):
    the residual and the normed input, then the larger of attention (qkv, fp32 rotary copies of q and k, the
    output) and the MLP (its intermediates). Assumed from the module's ops, not measured."""
    h, i = v.hidden_size, v.intermediate_size
    attn = compute_bytes * (3 * h + h) + 4 * 2 * h
    mlp = compute_bytes * (3 if v.swiglu else 2) * i
    per_token = compute_bytes * 2 * h + max(attn, mlp)
    return int(per_token * tokens_per_image(v, image_size) * images)
