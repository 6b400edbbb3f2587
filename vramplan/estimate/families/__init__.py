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
Vision families add: saved_bytes_per_token, tokens_per_image, image_tokens, forward_transient_bytes.
Projector families add: saved_bytes_per_image_token.
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
