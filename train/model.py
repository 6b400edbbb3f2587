"""The model: HF LLaVA or a decoder alone (AutoModelForCausalLM) load, or LLaVA assembly from parts,
quantization, LoRA (LLM + vision), projector loading.

Module tree (transformers 5): LLaVA `model.{vision_tower, multi_modal_projector, language_model}` + `lm_head`;
a decoder alone `model.{embed_tokens, layers, norm}` + `lm_head`. What it can train: vramplan.contract
training_refusal (TRAINER_TEXT_FAMILIES, TRAINER_VLM_FAMILIES).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from train.config import TrainConfig
from train.exit_codes import UsageError
from vramplan.contract import ALL_LINEAR, training_refusal

log = logging.getLogger("train")

# With transformers 5, llm_int8_skip_modules needs FULL module-name prefixes (the LLaVA tree is
# model.{vision_tower, multi_modal_projector, language_model}, transformers models/llava/modeling_llava.py):
# short names are silently ignored and the vision tower/projector get quantized too.
SKIP_QUANT = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
PROJ_KEY_MAPS = (  # projector checkpoints -> HF LLaVA (XTuner convert_xtuner_weights_to_hf.py key renames)
    (re.compile(r"^(?:.*\.)?projector\.model\.0\.(weight|bias)$"), "linear_1"),  # XTuner ProjectorModel
    (re.compile(r"^(?:.*\.)?projector\.model\.2\.(weight|bias)$"), "linear_2"),
    (re.compile(r"^(?:.*\.)?mm_projector\.0\.(weight|bias)$"), "linear_1"),  # LLaVA mlp2x_gelu mm_projector.bin
    (re.compile(r"^(?:.*\.)?mm_projector\.2\.(weight|bias)$"), "linear_2"),
    (re.compile(r"^(?:.*\.)?multi_modal_projector\.(linear_[12])\.(weight|bias)$"), None),  # already HF
)


def pick_device(requested: str) -> str:
    """cuda / npu / cpu from what is present; an explicit request that is absent is a usage error."""
    import torch

    npu = False
    try:
        import torch_npu  # noqa: F401

        npu = torch.npu.is_available()
    except Exception:  # noqa: BLE001 - a broken torch_npu install means no usable NPU
        npu = False
    present = {"cuda": torch.cuda.is_available(), "npu": npu, "cpu": True}
    if requested == "auto":
        return next(d for d in ("cuda", "npu", "cpu") if present[d])
    if not present[requested]:
        raise UsageError(f"--device {requested}: no {requested} device is available here", "use --device cpu or auto")
    return requested


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def quant_config(cfg: TrainConfig, device: str):
    """BitsAndBytesConfig for the LLM only; None for no quantization (and on Ascend NPU: bf16 LoRA instead)."""
    if cfg.quant == "none":
        return None
    if device == "npu":
        log.warning("bitsandbytes %s is not supported on Ascend NPU: training bf16 LoRA instead", cfg.quant)
        return None
    from transformers import BitsAndBytesConfig

    dt = torch_dtype(cfg.compute_dtype)
    if cfg.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_QUANT)
    # ZeRO-3 shards the 4-bit weights only when their storage dtype is the compute dtype (PEFT DeepSpeed docs).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=dt, bnb_4bit_quant_storage=dt, llm_int8_skip_modules=SKIP_QUANT)


def load_projector_state(path: str) -> dict:
    """A projector file (.safetensors / .pth / .bin; XTuner or LLaVA keys) -> {linear_1/2.weight/bias}."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(p))
        else:
            import torch

            raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt / foreign file: one line, exit 2
        raise UsageError(f"--projector {path}: cannot read it ({type(e).__name__}: {e})", "") from e
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    out = {}
    for k, v in raw.items():
        for rx, name in PROJ_KEY_MAPS:
            m = rx.match(k)
            if m:
                out[f"{name or m.group(1)}.{m.groups()[-1]}"] = v
                break
    need = {f"linear_{i}.{n}" for i in (1, 2) for n in ("weight", "bias")}
    if set(out) != need:
        raise UsageError(f"--projector {path}: no 2-layer projector found (keys: {sorted(raw)[:4]}...)",
                         "expected XTuner `projector.model.0/2.*` or LLaVA `model.mm_projector.0/2.*` keys")
    return out


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def assemble(cfg: TrainConfig, dest: Path) -> Path:
    """Build an HF LLaVA dir from an LLM dir + CLIP dir (+ projector) into `dest` (written once, then reused).

    Adds `<image>` (and `<pad>` if missing) to the tokenizer and resizes the embeddings, like XTuner's
    convert_xtuner_weights_to_hf.py. Writing to disk lets the quantizing `from_pretrained` path load it.
    """
    import torch
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if (dest / "ASSEMBLED").exists():
        return dest
    tok = _load_tokenizer(cfg.llm_path)
    added = {}
    if tok.convert_tokens_to_ids("<image>") in (None, tok.unk_token_id):
        added["additional_special_tokens"] = ["<image>"]
    if tok.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tok.add_special_tokens(added)
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm_path, dtype="auto")
    if len(tok) != llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tok))
    vcfg = CLIPVisionConfig.from_pretrained(cfg.vision_path)
    clip = CLIPVisionModel.from_pretrained(cfg.vision_path, dtype="auto")
    image_tokens = (vcfg.image_size // vcfg.patch_size) ** 2
    lcfg = LlavaConfig(
        vision_config=vcfg,
        text_config=llm.config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(lcfg).to(llm.dtype)
    with torch.no_grad():
        model.model.language_model.load_state_dict(llm.model.state_dict())
        model.lm_head.load_state_dict(llm.lm_head.state_dict())
        model.model.vision_tower.load_state_dict(clip.state_dict())
        if cfg.projector_path:
            model.model.multi_modal_projector.load_state_dict(load_projector_state(cfg.projector_path))
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    try:
        ip = AutoImageProcessor.from_pretrained(cfg.vision_path)
    except (OSError, ValueError):
        from transformers import CLIPImageProcessor

        ip = CLIPImageProcessor(size={"shortest_edge": vcfg.image_size},
                                crop_size={"height": vcfg.image_size, "width": vcfg.image_size})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=vcfg.patch_size,
                   vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(tmp)
    (tmp / "ASSEMBLED").write_text("ok\n")
    tmp.rename(dest)
    return dest


VLM_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
ANYRES = ("llava_next",)  # image tokens per image from the image's size (the processor's anyres grid)


def model_families(hf_config) -> dict:
    """plan.json's model.text_family/vision_family/projector_family of a transformers config: a VLM's
    model_type is its projector family ("llava"), its towers' model_types name the others
    ("clip_vision_model" -> "clip"); a decoder's model_type is its text family ("qwen2")."""
    text_cfg, vision_cfg = getattr(hf_config, "text_config", None), getattr(hf_config, "vision_config", None)
    if vision_cfg is None:  # Gemma 3 alone is "gemma3_text" (Gemma3ForCausalLM): the family gemma3
        return {"text_family": hf_config.model_type.removesuffix("_text"), "vision_family": None,
                "projector_family": None}
    return {"text_family": (getattr(text_cfg, "model_type", None) or "llama").removesuffix("_text"),
            "vision_family": vision_cfg.model_type.removesuffix("_vision_model"),
            "projector_family": hf_config.model_type}


def check_trainable(path: str, cfg: TrainConfig) -> dict:
    """The model's families from its config.json (model_families); UsageError when the trainer cannot
    train them (the plan's own rule, vramplan.contract.training_refusal), before the data and the weights load."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--model {path}: cannot read its config.json ({type(e).__name__}: {str(e)[:200]})",
                         "pass an HF LLaVA dir, a decoder dir (AutoModelForCausalLM) or --llm/--vision parts") from e
    fams = model_families(hf)
    refused = training_refusal(cfg.recipe, cfg.quant, bool(cfg.train_llm_full), cfg.device, model=fams)
    if refused:  # the settings alone were judged in TrainConfig: here the model's families
        raise UsageError(f"--model {path}: {refused[2]}", "`vramplan estimate` still plans it")
    return fams


def load_base(path: str, cfg: TrainConfig, device: str, local_rank: int = 0, families: dict | None = None):
    """The model by its projector family (`families`, else read by check_trainable): LLaVA-1.5
    (LlavaForConditionalGeneration), LLaVA-NeXT (LlavaNextForConditionalGeneration, anyres) or a decoder alone
    (AutoModelForCausalLM), its LLM quantized when asked; + the tokenizer and the image processor (LLaVA-NeXT:
    the whole LlavaNextProcessor, which counts an image's anyres tokens; None for a decoder)."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    proj = (families or check_trainable(path, cfg))["projector_family"]
    q = quant_config(cfg, device)
    attn = {"flash": "flash_attention_2"}.get(cfg.attn_implementation, cfg.attn_implementation)
    if attn == "flash_attention_2" and device != "cuda":
        raise UsageError(f"--attn flash: FlashAttention-2 needs a CUDA GPU (device: {device})", "use --attn sdpa")
    kw = {"dtype": torch_dtype(cfg.compute_dtype), "attn_implementation": attn}
    if q is not None:
        kw["quantization_config"] = q
        if cfg.zero_stage != 3:  # ZeRO-3 is incompatible with a device_map
            kw["device_map"] = {"": f"cuda:{local_rank}" if device == "cuda" else device}
    cls = getattr(transformers, VLM_CLASSES[proj] if proj else "AutoModelForCausalLM")
    try:
        try:
            model = cls.from_pretrained(path, **kw)
        except ValueError as e:  # Gemma 2 has no SDPA path (soft-capping): transformers' own default is eager
            if kw["attn_implementation"] != "sdpa" or "does not support an attention implementation" not in str(e):
                raise
            log.warning("%s has no SDPA attention in transformers: training with eager attention", path)
            model = cls.from_pretrained(path, **dict(kw, attn_implementation="eager"))
    except (OSError, ValueError) as e:
        if "out of memory" in str(e).lower():
            raise
        raise UsageError(f"--model {path}: cannot load it as {cls.__name__} ({type(e).__name__}: {str(e)[:200]})",
                         "pass an HF LLaVA dir, a decoder dir (AutoModelForCausalLM) or --llm/--vision parts") from e
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # Llama 3, Mistral: padding is masked out of attention and labels anyway
        tok.pad_token = tok.eos_token
    if proj is None:
        return model, tok, None
    images = AutoProcessor if proj in ANYRES else AutoImageProcessor
    return model, tok, images.from_pretrained(path)


def _linear_names(model, prefix: str) -> set[str]:
    import torch.nn as nn

    names = set()
    for name, mod in model.named_modules():
        if name.startswith(prefix) and isinstance(mod, nn.Linear):  # bnb Linear4bit/8bitLt subclass nn.Linear
            names.add(name.rsplit(".", 1)[-1])
    return names


def target_regex(model, cfg: TrainConfig) -> str:
    """One regex over module names: LLM linears (all-linear = every Linear but lm_head, like XTuner's
    find_all_linear_names) and, with a vision LoRA, the CLIP tower's linears."""
    parts = []
    if cfg.llm_lora:
        t = cfg.llm_lora.targets
        # an LLM alone (LlamaForCausalLM, benchmarks/trace_step.py) has no language_model level
        nested = any(n == "model.language_model" for n, _ in model.named_modules())
        llm = "model.language_model." if nested else "model."
        names = _linear_names(model, llm) if ALL_LINEAR in t else set(t) - {"lm_head"}
        parts.append(re.escape(llm) + r".*\.(?:%s)" % "|".join(sorted(map(re.escape, names))))
        if "lm_head" in t:  # named only: all-linear leaves lm_head out (peft's rule too)
            parts.append(r"lm_head")
    if cfg.vision_lora:
        t = cfg.vision_lora.targets
        names = _linear_names(model, "model.vision_tower.") if ALL_LINEAR in t else set(t)
        parts.append(r"model\.vision_tower\..*\.(?:%s)" % "|".join(sorted(map(re.escape, names))))
    return "|".join(f"(?:{p})" for p in parts)


def cast_embeddings_back(model, dtype) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast for the input embeddings and the lm_head (recipe
    kbit_embed_dtype bf16), as TRL's SFTTrainer does under bf16 (trl trainer/utils.py peft_module_casting_to_bf16)
    and qlora.py before it; the norms stay fp32. Before peft wraps the model, so modules_to_save copies follow."""
    both = (model.get_input_embeddings(), model.get_output_embeddings())
    for m in {id(m): m for m in both if m is not None}.values():  # tied: one module
        m.to(dtype)


def prepare(model, cfg: TrainConfig):
    """Freeze, add LoRA (LLM and vision: one adapter, per-tower rank/alpha via rank_pattern/alpha_pattern),
    make the projector trainable. Returns the model to train."""
    import torch

    quantized = bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False))
    gc_kwargs = {"use_reentrant": False}
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        if cfg.kbit_embed_dtype == "bf16":
            cast_embeddings_back(model, torch_dtype(cfg.compute_dtype))
    elif cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    vlm = any(n == "model.vision_tower" for n, _ in model.named_modules())
    if cfg.recipe in ("pretrain", "full") or (cfg.llm_lora is None and cfg.vision_lora is None):
        for n, p in model.named_parameters():
            llm = "language_model" in n or n.startswith("lm_head") or not vlm  # a decoder alone: every weight
            p.requires_grad_(("multi_modal_projector" in n and cfg.train_projector) or (cfg.train_llm_full and llm))
        return model
    from peft import LoraConfig, get_peft_model

    main = cfg.llm_lora or cfg.vision_lora
    vis = {r"model\.vision_tower\..*": cfg.vision_lora} if cfg.vision_lora and cfg.llm_lora else {}
    lc = LoraConfig(r=main.r, lora_alpha=main.alpha, lora_dropout=main.dropout, bias="none",
                    target_modules=target_regex(model, cfg),
                    rank_pattern={k: v.r for k, v in vis.items()}, alpha_pattern={k: v.alpha for k, v in vis.items()},
                    modules_to_save=(["multi_modal_projector"] if cfg.train_projector and vlm else [])
                    + list(cfg.modules_to_save) or None)
    model = get_peft_model(model, lc)
    # trainable weights in fp32 (the optimizer's master copy); "pure bf16" (trainable_dtype bf16, plain
    # PyTorch only: DeepSpeed keeps its own fp32 master) trains them in bf16 (vramplan optimizers.py)
    want = torch.bfloat16 if cfg.trainable_dtype == "bf16" and cfg.ds_config is None else torch.float32
    # "peft": as peft leaves them, only the adapters in fp32; modules_to_save copies keep the model's dtype
    keep = cfg.trainable_dtype == "peft" and cfg.ds_config is None
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != want and not (keep and "lora_" not in n):
            p.data = p.data.to(want)
    return model
