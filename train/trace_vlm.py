"""The traced path for a vision-language model no family module knows (docs/estimate.md#the-traced-path).

A config whose transformers class is an image-text-to-text model (transformers models/auto/modeling_auto.py
MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) with a vision_config is built with AutoModelForImageTextToText.
  * components: the language model is the module `get_decoder()` returns (plus the output head); a child of
    the inner model whose name says "vision", "visual" or "tower" is the tower; every other child with weights
    is the projector;
  * the step's image inputs: the model's own image processor, built from the dir's preprocessor_config.json
    (transformers models/auto/image_processing_auto.py get_image_processor_class_from_name), run on a blank
    image of the planned size: pixel_values and whatever else it returns (image_sizes, pixel_attention_mask, ...);
  * image tokens per image: the rows of the model's own get_image_features output (`pooler_output`: what
    get_placeholder_mask must match) on those inputs, with the tower and projector materialized on the CPU (the
    count depends on the geometry only, not on the weights);
  * the recipe as train/model.py prepare does it for LLaVA: LoRA on the language model's Linears only, the tower
    frozen and not quantized, the projector trained (PEFT modules_to_save) when the recipe trains it.
A type that needs more (a processor that needs the text, a forward that needs extra tensors) is refused.
"""

from __future__ import annotations

import inspect
import re

from train.trace_model import TraceError

VISION_NAMES = ("vision", "visual", "tower")  # vision_tower, vision_model, visual, image_tower, video_tower
PROCESSOR_KEYS_DROPPED = ("image_processor_type", "processor_class", "auto_map", "image_processor")


def _line(e: BaseException, n: int = 120) -> str:
    return " ".join(str(e).split())[:n]


def is_vlm(cfg) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vlm_types

    return cfg.model_type in vlm_types and getattr(cfg, "vision_config", None) is not None


def build_meta(cfg, **kw):
    """The VLM on whatever device is current (the caller's torch.device or fake mode)."""
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    try:  # no init: the values do not matter, and some inits (SigLIP's lecun_normal_) read data under fake mode
        with no_init_weights():
            model = AutoModelForImageTextToText.from_config(cfg, **kw)
    except (ValueError, KeyError) as e:
        raise TraceError("unsupported", f"{type(cfg).__name__}: no image-text-to-text class in transformers "
                                        f"({str(e).splitlines()[0][:160]})") from None
    model.tie_weights()  # no_init_weights skips the tying too
    return model


def parts(model) -> dict:
    """{"llm": [prefix], "vision": [prefixes], "projector": [prefixes]} of module names (see the module text)."""
    dec = model.get_decoder()
    names = {id(m): n for n, m in model.named_modules()}
    llm = names.get(id(dec))
    if not llm:
        raise TraceError("unsupported", f"{type(model).__name__}: its language model is not a submodule")
    parent = model.get_submodule(llm.rpartition(".")[0]) if "." in llm else model
    base = llm.rpartition(".")[0]
    out = {"llm": [llm], "vision": [], "projector": [], "params": []}
    for n, c in parent.named_children():
        full = f"{base}.{n}" if base else n
        if full == llm or not any(True for _ in c.parameters()):
            continue
        out["vision" if any(w in n for w in VISION_NAMES) else "projector"].append(full)
    # the inner model's own parameters (BLIP-2's query_tokens): the projector's
    out["params"] = [f"{base}.{n}" if base else n for n, _ in parent.named_parameters(recurse=False)]
    if not out["vision"]:
        raise TraceError("unsupported", f"{type(model).__name__}: no vision tower found beside {llm}")
    return out


def component(name: str, pp: dict) -> str:
    for comp in ("vision", "projector"):
        if any(name == p or name.startswith(p + ".") for p in pp[comp]):
            return comp
    return "projector" if name in pp.get("params", ()) else "llm"


def image_inputs(model_type: str, processor: dict | None, image_size) -> dict:
    """The image processor's output (real CPU tensors) for one blank image of image_size (h, w), or of the
    processor's default size when None."""
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    if not processor or not isinstance(processor.get("image_processor_type"), str):
        raise TraceError("unsupported", f"model_type {model_type!r}: tracing a vision-language model needs its "
                                        "preprocessor_config.json (with image_processor_type) in the model dir")
    cls = get_image_processor_class_from_name(processor["image_processor_type"])
    if cls is None:
        raise TraceError("unsupported", f"image processor {processor['image_processor_type']!r} is unknown to "
                                        "transformers")
    import transformers.utils.logging as hf_logging
    from PIL import Image

    hf_logging.set_verbosity_error()  # "requires torchvision ... falling back to the PIL backend"
    try:
        ip = cls(**{k: v for k, v in processor.items() if k not in PROCESSOR_KEYS_DROPPED})
        if image_size is None:
            s = getattr(ip, "size", None) or {}
            s = s if isinstance(s, dict) else dict(s)
            h = s.get("height") or s.get("shortest_edge") or s.get("longest_edge") or 224
            image_size = (h, s.get("width") or h)
        img = Image.new("RGB", (int(image_size[1]), int(image_size[0])), (128, 128, 128))
        out = ip(images=[img], return_tensors="pt")
    except ImportError as e:  # a torchvision-only processor
        raise TraceError("unsupported", f"model_type {model_type!r}: its image processor {cls.__name__} needs a "
                                        f"package that is not installed ({_line(e)})") from None
    except Exception as e:  # noqa: BLE001  (any processor failure: one line)
        raise TraceError("unsupported", f"model_type {model_type!r}: its image processor "
                                        f"{cls.__name__} failed ({type(e).__name__}: {_line(e)})") from None
    return {"image_size": [int(image_size[0]), int(image_size[1])],
            "tensors": {k: v for k, v in out.items() if hasattr(v, "shape")}}


def forward_inputs(model, tensors: dict) -> dict:
    """The processor tensors the model's forward takes."""
    sig = inspect.signature(model.forward).parameters
    return {k: v for k, v in tensors.items() if k in sig}


def image_tokens(cfg, tensors: dict) -> int:
    """Tokens one image takes in the LLM's sequence: the rows of get_image_features (see the module text)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # weights on meta, buffers (position ids) real
        model = build_meta(cfg)
    pp = parts(model)
    inner = model.get_submodule(pp["llm"][0].rpartition(".")[0]) if "." in pp["llm"][0] else model
    for name in pp["params"]:
        parent, _, k = name.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        mod._parameters[k] = torch.nn.Parameter(torch.full(mod._parameters[k].shape, 0.01), requires_grad=False)
    for name in pp["vision"] + pp["projector"]:
        for mod in model.get_submodule(name).modules():
            for k, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[k] = torch.nn.Parameter(torch.full(p.shape, 0.01, dtype=torch.float32),
                                                            requires_grad=False)
    fn = getattr(inner, "get_image_features", None)
    if fn is None:
        raise TraceError("unsupported", f"{type(model).__name__}: no get_image_features to count image tokens by "
                                        "(the trace needs images that enter the LLM sequence as tokens)")
    sig = inspect.signature(fn).parameters
    try:
        with torch.no_grad():
            out = fn(**{k: v for k, v in tensors.items() if k in sig})
    except Exception as e:  # noqa: BLE001
        raise TraceError("unsupported", f"{type(model).__name__}.get_image_features failed on the processor's "
                                        f"output ({type(e).__name__}: {_line(e)})") from None
    feats = getattr(out, "pooler_output", None) if not isinstance(out, (torch.Tensor, list, tuple)) else out
    if feats is None:
        raise TraceError("unsupported", f"{type(model).__name__}: get_image_features returned no features")
    feats = [feats] if isinstance(feats, torch.Tensor) else list(feats)
    return sum(f.shape[:-1].numel() for f in feats)


def data_dependent(e: BaseException) -> bool:
    """A fake-tensor trace stopped by an op whose result depends on tensor values (torch._subclasses)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    return isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)) or (
        isinstance(e, (NotImplementedError, RuntimeError)) and ("meta tensor" in str(e) or "nonzero" in str(e)))


def data_dependent_message(model_type: str, e: BaseException) -> str:
    """Where in the model's code the value-dependent op is, for the one-line refusal."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/transformers/models/" in f.filename]
    at = f" at transformers models/{frames[-1].filename.split('/transformers/models/')[1]}:{frames[-1].lineno}" \
        if frames else ""
    return (f"model_type {model_type!r} cannot be traced: its forward reads tensor values{at} "
            f"({type(e).__name__}: {_line(e, 80)}), which the fake-tensor trace does not have")


def image_token_id(cfg) -> int:
    for k in ("image_token_id", "image_token_index"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    raise TraceError("unsupported", f"{type(cfg).__name__}: no image_token_id in the config")


def lora_regex(model, pp: dict, targets) -> str:
    """PEFT target_modules on the language model only (train/model.py target_regex's rule)."""
    import torch.nn as nn

    from vramplan.contract import ALL_LINEAR

    llm = pp["llm"][0]
    if ALL_LINEAR in targets:
        names = {n.rpartition(".")[2] for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n.startswith(llm + ".")}
    else:
        names = set(targets) - {"lm_head"}
    return re.escape(llm) + r"\..*\.(?:%s)" % "|".join(sorted(map(re.escape, names)))


def setup(cfg, req: dict, count: int | None = None) -> dict | None:
    """A VLM request's image inputs: None for a causal LM; else image_size, image_tokens (per image),
    image_token (its id), hidden_size (the LLM's) and the processor tensors. `count` skips the recount."""
    if not is_vlm(cfg):
        return None
    got = image_inputs(cfg.model_type, req.get("processor"), req.get("image_size"))
    n = count if count is not None else image_tokens(cfg, got["tensors"])
    if n < 1:
        raise TraceError("unsupported", f"model_type {cfg.model_type!r}: the image gave no image features")
    if req["steps"] and n * int(req.get("images_per_sample", 1)) >= req["seq_len"]:
        raise TraceError("unsupported", f"one image takes {n} tokens: sequence length {req['seq_len']} leaves "
                                        "no text (raise --seq-len)")
    return {"image_size": got["image_size"], "image_tokens": n, "image_token": image_token_id(cfg),
            "hidden_size": int(cfg.get_text_config().hidden_size), "tensors": got["tensors"]}
