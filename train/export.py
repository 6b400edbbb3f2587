"""final/: the PEFT adapter(s) and the projector in safetensors (docs/contracts.md).

final/adapter_config.json + adapter_model.safetensors   LLM LoRA (+ the projector as modules_to_save)
final/vision_adapter/                                   CLIP LoRA, when trained
final/projector.safetensors                             multi_modal_projector.linear_1/linear_2.{weight,bias}
Under ZeRO-3 the trainable parameters are gathered first (all ranks), rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.config import TrainConfig

VISION = "vision_tower"


def _trainable_state(model) -> dict:
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _n, p in named]
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitioned: gather on every rank
        import deepspeed

        out = {}
        for n, p in named:  # one tensor at a time: the GPU holds at most the largest one gathered
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[n] = p.detach().to("cpu", torch.float32).clone()
        return out
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}


def _projector(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if "multi_modal_projector" in k:
            tail = k.split("multi_modal_projector.")[-1].replace("modules_to_save.default.", "")
            if tail.startswith("original_module."):
                continue
            out[f"multi_modal_projector.{tail}"] = v.contiguous()
    return out


def export_final(model, cfg: TrainConfig, dest: Path, is_main: bool) -> Path:
    from safetensors.torch import save_file

    state = _trainable_state(model)  # collective under ZeRO-3: every rank calls it
    if not is_main:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    proj = _projector(state)
    if proj:
        save_file(proj, str(dest / "projector.safetensors"))
    if not hasattr(model, "peft_config"):
        others = {k: v.contiguous() for k, v in state.items() if "multi_modal_projector" not in k}
        if others:  # recipe "full": the trained LLM weights
            save_file(others, str(dest / "trainable.safetensors"))
        return dest
    from peft import LoraConfig, get_peft_model_state_dict

    base = model.peft_config["default"]
    sd = get_peft_model_state_dict(model, state_dict={k: v for k, v in state.items()})
    llm_sd = {k: v.contiguous() for k, v in sd.items() if VISION not in k}
    vis_sd = {k: v.contiguous() for k, v in sd.items() if VISION in k}
    target = base.target_modules
    llm_t, vis_t = (target.split("|(?:model\\.vision_tower")[0], None) if isinstance(target, str) else (target, None)
    if cfg.llm_lora and llm_sd:
        lc = LoraConfig(r=cfg.llm_lora.r, lora_alpha=cfg.llm_lora.alpha, lora_dropout=cfg.llm_lora.dropout,
                        target_modules=llm_t if cfg.vision_lora else target, bias="none",
                        modules_to_save=base.modules_to_save)
        lc.base_model_name_or_path = base.base_model_name_or_path
        lc.save_pretrained(str(dest))
        save_file(llm_sd, str(dest / "adapter_model.safetensors"))
    if cfg.vision_lora and vis_sd:
        vis_t = r"model\.vision_tower\..*\.(?:%s)" % "|".join(
            sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in vis_sd}))
        vdir = dest / "vision_adapter" if cfg.llm_lora else dest
        vc = LoraConfig(r=cfg.vision_lora.r, lora_alpha=cfg.vision_lora.alpha, lora_dropout=cfg.vision_lora.dropout,
                        target_modules=vis_t, bias="none",
                        modules_to_save=None if cfg.llm_lora else base.modules_to_save)
        vc.base_model_name_or_path = base.base_model_name_or_path
        vc.save_pretrained(str(vdir))
        save_file(vis_sd if cfg.llm_lora else sd, str(vdir / "adapter_model.safetensors"))
    (dest / "train_meta.json").write_text(json.dumps({"recipe": cfg.recipe, "quant": cfg.quant,
                                                      "compute_dtype": cfg.compute_dtype,
                                                      "kbit_embed_dtype": cfg.kbit_embed_dtype}, indent=1))
    return dest


def load_for_inference(model_dir: str, final_dir: str, cfg: TrainConfig, device: str = "cpu"):
    """Base model (quantized as in training) + final/ adapter(s) + projector, eval mode. For tests and users."""
    import torch
    from peft import PeftModel

    from train.model import cast_embeddings_back, load_base, torch_dtype

    base, tok, ip = load_base(model_dir, cfg, device)
    if getattr(base, "is_quantized", False):  # the same numerics as training: prepare_model_for_kbit_training
        for p in base.parameters():          # keeps every non-quantized weight in fp32
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ not in ("Params4bit", "Int8Params"):
                p.data = p.data.float()
        if cfg.kbit_embed_dtype == "bf16":  # and the recipe may have cast the embeddings + lm_head back
            cast_embeddings_back(base, torch_dtype(cfg.compute_dtype))
    final = Path(final_dir)
    if (final / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(base, str(final), adapter_name="default")
        if (final / "vision_adapter" / "adapter_config.json").exists():
            model.load_adapter(str(final / "vision_adapter"), adapter_name="vision")
            model.base_model.set_adapter(["default", "vision"])
    else:
        model = base
        if (final / "projector.safetensors").exists():
            from safetensors.torch import load_file

            sd = {
                k.replace("multi_modal_projector.", ""): v
                for k, v in load_file(str(final / "projector.safetensors")).items()
            }
            base.model.multi_modal_projector.load_state_dict(sd)
    model.eval()
    return model, tok, ip
