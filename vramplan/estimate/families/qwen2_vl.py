"""Qwen2-VL / Qwen2.5-VL (transformers `Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`):
the Qwen2 ViT (families/qwen2_vl_vit.py) -> the PatchMerger -> a Qwen2 decoder (families/qwen2.py).

The PatchMerger (models/qwen2_vl/modeling_qwen2_vl.py PatchMerger, models/qwen2_5_vl/ Qwen2_5_VLPatchMerger) is
this wrapper's projector: a norm over the ViT width c (LayerNorm 2c, Qwen2.5-VL RMSNorm c), then the
merge_size**2 neighbouring patches concatenated (c*m*m) -> Linear(c*m*m, c*m*m) -> GELU -> Linear(c*m*m, out), both
with bias. Multimodal rotary positions (mrope) add no parameters; the text part is Qwen2's layout (q/k/v biases).

Config (configuration_qwen2_vl.py): the text keys are flat in config.json (the released checkpoints) or under
text_config (as transformers 5 saves them); lm_head is tied when either level says tie_word_embeddings.
Image tokens come from the image size and the processor's min_pixels/max_pixels (qwen2_vl_vit.resized).
A trained merger saves per merged token its norm's input and statistics (LayerNorm; an RMSNorm over a frozen
tower's output saves its normalised input only) and the inputs of both Linears and the GELU (measured,
tests/estimate/test_vlm_families_qwen_idefics.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vramplan.contract import ContractError, require
from vramplan.estimate.families import LinearGroup, llama, qwen2
from vramplan.estimate.families import qwen2_vl_vit as vit
from vramplan.estimate.families.llava import LlavaParts

ROLE = "projector"
HF_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
PROFILE_FIELDS = {"in_features": (int, True, 1), "out_features": (int, True, 1), "merge_size": (int, False, 1),
                  "rms_norm": (bool, False, None)}
# Qwen2VLTextConfig / Qwen2_5_VLTextConfig defaults (the same numbers)
TEXT_DEFAULTS = {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
                 "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768}
TEXT_MAX_WINDOW_LAYERS = 80
# Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig defaults
VISION_DEFAULTS = {
    "qwen2_vl": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16},
    "qwen2_5_vl": {"depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16,
                   "out_hidden_size": 3584, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
}
COMMON_VISION = {"in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
DEFAULT_IMAGE_TOKEN_ID = 151655


@dataclass(frozen=True)
class ProjectorSpec:
    """The PatchMerger."""

    family: ClassVar[str] = "qwen2_vl"
    in_features: int  # the ViT width c
    out_features: int  # the LLM's hidden size
    merge_size: int = 2
    rms_norm: bool = False  # Qwen2.5-VL

    @property
    def merged(self) -> int:
        return self.in_features * self.merge_size**2


SPEC = ProjectorSpec


def linear_groups(p: ProjectorSpec) -> list[LinearGroup]:
    return [LinearGroup("projector", "mlp.0", p.merged, p.merged, True, 1),
            LinearGroup("projector", "mlp.2", p.merged, p.out_features, True, 1)]


def other_params(p: ProjectorSpec) -> dict[str, int]:
    return {"ln_q": p.in_features * (1 if p.rms_norm else 2)}


def saved_bytes_per_image_token(p: ProjectorSpec, compute_bytes: int) -> int:
    """A trained merger, per merged token: the norm's saved input (m*m patches), both Linears' and GELU's inputs."""
    norm = p.merged * compute_bytes if p.rms_norm else p.merge_size**2 * (p.in_features * compute_bytes + 4)
    return norm + 3 * p.merged * compute_bytes


def tower_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None = None) -> int:
    return vit.tokens_per_image(v, image_size)


def llm_tokens_per_image(p: ProjectorSpec, v, image_size: tuple[int, int] | None = None) -> int:
    return vit.image_tokens(v, image_size)


def default_image_size(p: ProjectorSpec, v) -> tuple[int, int]:
    """The processor keeps an image's own resolution: without a stated size, qwen2_vl_vit.DEFAULT_IMAGE_SIZE."""
    return vit.DEFAULT_IMAGE_SIZE


def from_hf_config(cfg: dict, where: str, processor: dict | None = None) -> LlavaParts:
    """The parts of a `Qwen2VLConfig` / `Qwen2_5_VLConfig`-shaped dict and its processor config."""
    mt = require(cfg, "model_type", str, where, choices=HF_MODEL_TYPES)
    tc = require(cfg, "text_config", dict, where, allow_none=True, default=None)
    prefix = "text_config." if tc is not None else ""
    tc = cfg if tc is None else tc
    fields = llama.hf_fields(tc, where, prefix, TEXT_DEFAULTS)
    fields.update(attention_bias=False, mlp_bias=False)
    tie = any(require(d, "tie_word_embeddings", bool, where, allow_none=True, default=None) for d in (cfg, tc))
    fields.update(tie_word_embeddings=bool(tie))
    window_cfg = {"max_window_layers": TEXT_MAX_WINDOW_LAYERS, **{k: v for k, v in tc.items() if v is not None}}
    text = qwen2.Qwen2Spec(**fields, **qwen2.window_fields(window_cfg, where, prefix, fields["num_layers"]))
    vision, out = _vision(cfg, mt, where, processor)
    proj = ProjectorSpec(vision.hidden_size, out, vision.merge_size, rms_norm=vision.swiglu)
    image_id = require(cfg, "image_token_id", int, where, allow_none=True, default=None)
    image_id = DEFAULT_IMAGE_TOKEN_ID if image_id is None else image_id
    return LlavaParts(text, vision, proj, 0 <= image_id < text.vocab_size)


def _vision(cfg: dict, mt: str, where: str, processor: dict | None) -> tuple[vit.VisionSpec, int]:
    vc = require(cfg, "vision_config", dict, where, allow_none=True, default=None) or {}
    d = {**COMMON_VISION, **VISION_DEFAULTS[mt]}

    def get(key, kind=int, lo=1, alias=None):
        v = require(vc, key, kind, where, label="vision_config." + key, min=lo, allow_none=True, default=None)
        if v is None and alias:
            v = require(vc, alias, kind, where, label="vision_config." + alias, min=lo, allow_none=True, default=None)
        return d.get(key) if v is None else v

    heads = get("num_heads")
    common = dict(num_layers=get("depth"), num_attention_heads=heads, patch_size=get("patch_size"),
                  temporal_patch_size=get("temporal_patch_size"), merge_size=get("spatial_merge_size"),
                  num_channels=get("in_channels", alias="in_chans"), **pixel_bounds(processor, where))
    if mt == "qwen2_vl":
        width = get("embed_dim")
        spec = vit.VisionSpec(hidden_size=width, intermediate_size=int(width * get("mlp_ratio", (int, float))),
                              **common)
        out = get("hidden_size")
    else:
        width = get("hidden_size")
        full = get("fullatt_block_indexes", list, None)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in full):
            raise ContractError(f"{where}: vision_config.fullatt_block_indexes: must list block numbers")
        spec = vit.VisionSpec(hidden_size=width, intermediate_size=get("intermediate_size"), swiglu=True,
                              window_size=get("window_size", lo=0),
                              full_attention_blocks=len({x for x in full if 0 <= x < common["num_layers"]}), **common)
        out = get("out_hidden_size")
    if width % heads:
        raise ContractError(f"{where}: vision_config: the ViT width {width} is not a multiple of num_heads {heads}")
    return spec, out


def image_processor_fields(processor: dict | None) -> dict:
    """The image processor's settings: preprocessor_config.json's keys, or processor_config.json's
    `image_processor` table (transformers 5 saves one file holding both)."""
    if not isinstance(processor, dict):
        return {}
    nested = processor.get("image_processor")
    return {**processor, **nested} if isinstance(nested, dict) else processor


def pixel_bounds(processor: dict | None, where: str) -> dict:
    """min_pixels/max_pixels as Qwen2VLImageProcessor reads them: size {shortest_edge, longest_edge},
    overridden by min_pixels/max_pixels keys; its class defaults when absent."""
    ip, label = image_processor_fields(processor), f"{where} (processor config)"
    size = ip.get("size") if isinstance(ip.get("size"), dict) else {}

    def get(obj, key, default):
        v = require(obj, key, int, label, min=1, allow_none=True, default=None)
        return default if v is None else v

    lo = get(ip, "min_pixels", get(size, "shortest_edge", vit.MIN_PIXELS))
    hi = get(ip, "max_pixels", get(size, "longest_edge", vit.MAX_PIXELS))
    if lo > hi:
        raise ContractError(f"{label}: min_pixels {lo} is larger than max_pixels {hi}")
    return {"min_pixels": lo, "max_pixels": hi}
