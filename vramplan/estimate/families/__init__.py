"""Architecture families: one module per family, the only place that knows a family's layout.

A family module owns its config dataclass (`Spec`-like, with a class attribute `family` equal to the
module's name), its parameter groups and Linear names, its per-token activation coefficients and
FLOPs, and how to read it from a Hugging Face `config.json`. The generic estimate (params.py,
activations.py, timing.py, inference.py) only calls the functions below on `module_for(spec)`.

Every family module defines:
  ROLE              "text" (a decoder LLM), "vision" (an image tower) or "projector"
  HF_MODEL_TYPES    the `model_type` values of config.json it reads
  PROFILE_FIELDS    {key: (type, required, minimum)} of its table in a profile TOML
  SPEC              its config dataclass (a profile table or from_hf_config builds it)
  from_hf_config(cfg: dict, where: str) -> spec      (raises ValueError with a one-line reason)
  linear_groups(spec) -> list[LinearGroup]           every nn.Linear, by name and shape
  other_params(spec) -> dict[str, int]               every other parameter tensor group
Text families add: saved_bytes_per_token, checkpointed_bytes_per_token, final_norm_bytes_per_token,
  attention_flops_per_token, kv_bytes_per_token, kv_cache_tokens (tokens a layer's KV cache holds for a context:
  the context, or less under a sliding window), prefill_bytes_per_token, layer_params, chat_template; optionally
  loss_extra_bytes_per_logit(spec, compute_bytes) (ops on the logits before the loss: families/gemma.py).
Vision families add: saved_bytes_per_token, tokens_per_image (one crop at the tower's size), image_tokens,
  forward_transient_bytes(v, images, compute_bytes) (`images` counts crops of tokens_per_image tokens: the
  generic code passes tower tokens / tokens_per_image, so a family may keep images x its own tokens).
Projector families (ROLE "projector", a VLM wrapper: HF_MODEL_TYPES are VLM config.json model_types) add:
  from_hf_config(cfg, where, processor=None) -> LlavaParts-like (text, vision, projector, image_token_added),
    `processor` the parsed preprocessor_config.json / processor_config.json or None;
  saved_bytes_per_image_token(p, compute_bytes);
  tower_tokens_per_image(p, v, image_size) -> int   tokens the tower processes per image (all crops or tiles);
  llm_tokens_per_image(p, v, image_size) -> int     tokens the image takes in the LLM's sequence;
  image_size is (height, width) in pixels, or None for the processor's default size. Optional:
  projector_tokens_per_image(p, v, image_size) (tokens the projector maps, when not the LLM's: before
  unpadding or pooling), default_image_size(p, v) (the size None stands for) with DEFAULT_SIZE_NOTE (how the
  output names it), IMAGE_SIZE_MATTERS = False
  (tokens do not depend on the image size: a --dataset scan then skips reading image headers).
Optional text hooks (mixtures of experts, families/mixtral.py): parameter_lora_params (LoRA PEFT puts on non-Linear
  parameters), saved_bytes_per_layer (saves that do not scale with tokens), active_matmul_params and
  active_intermediate_size (what one token computes), unread_params (weights a decode step skips),
  dispatch_bytes_per_token (a layer's forward buffers, added to the recomputed layer).
docs/architecture.md#adding-a-model-family lists what adding one takes.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

from vramplan.contract import ALL_LINEAR  # every nn.Linear except lm_head (PEFT "all-linear")


@dataclass(frozen=True)
class LinearGroup:
    """Identical nn.Linear modules (same name and shape) of one component."""

    component: str  # "llm" | "vision" | "projector"
    name: str  # module-name suffix (q_proj, ..., out_proj, fc1, fc2, linear_1, linear_2)
    d_in: int
    d_out: int
    bias: bool
    count: int  # how many such modules in the whole model

    @property
    def params(self) -> int:
        """Weights + biases of all modules in the group."""
        return (self.d_in * self.d_out + (self.d_out if self.bias else 0)) * self.count


def targeted(group: LinearGroup, targets: tuple[str, ...]) -> bool:
    """PEFT `target_modules` semantics on module-name suffixes; "all-linear" = every Linear (not lm_head)."""
    return ALL_LINEAR in targets or group.name in targets


def module_for(spec) -> ModuleType:
    """The family module of a spec (its `family` class attribute names the module)."""
    return importlib.import_module(f"{__name__}.{spec.family}")


def family_modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]


def for_model_type(role: str, model_type: str) -> ModuleType | None:
    """The family module of `role` that reads config.json's `model_type`, or None."""
    for mod in family_modules():
        if role == mod.ROLE and model_type in mod.HF_MODEL_TYPES:
            return mod
    return None


def known_model_types(role: str) -> list[str]:
    return sorted(t for mod in family_modules() if role == mod.ROLE for t in mod.HF_MODEL_TYPES)
