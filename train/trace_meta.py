"""The traced path's parameter groups: the model of a config built on the meta device (train/trace_model.py).

Every nn.Linear (and transformers' Conv1D) by module-name suffix and shape, the output head excluded; every other
parameter as embedding, untied head or other, tied weights once (nn.Module.named_parameters drops duplicates);
which Linears LoRA adapts, read from PEFT itself (get_peft_model on the meta model: tuners_utils.py
_maybe_include_all_linear_layers for "all-linear", module-name suffixes otherwise).
"""

from __future__ import annotations

from train.trace_model import TraceError
from vramplan.contract import ALL_LINEAR


def head_name(model) -> str:
    """The output embedding's module name (lm_head for most; PEFT's all-linear leaves it out)."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), "lm_head")


def _linear_shape(m) -> tuple[int, int] | None:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, Conv1D):  # weight [in, out] (GPT-2)
        return m.weight.shape[0], m.weight.shape[1]
    return None


def _layers(model, n_layers: int):
    """The decoder's layer list: the largest nn.ModuleList of n_layers entries."""
    import torch.nn as nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _dims(cfg) -> dict:
    """The sizes the estimate uses besides the parameter groups (attention FLOPs, buckets, embeddings)."""
    h, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    kv = getattr(cfg, "num_key_value_heads", None) or (getattr(cfg, "num_kv_heads", None)  # Falcon
                                                      if getattr(cfg, "new_decoder_architecture", False) else None) \
        or (1 if getattr(cfg, "multi_query", False) else heads)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_hidden_size", None) or \
        getattr(cfg, "n_inner", None) or 4 * h
    return {"num_layers": int(cfg.num_hidden_layers), "hidden_size": h, "vocab_size": int(cfg.vocab_size),
            "num_attention_heads": heads, "num_key_value_heads": int(kv), "head_dim": head_dim,
            "intermediate_size": int(inter), "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", 0) or 0)}


def meta_groups(cfg, lora: dict | None, quant: str = "none") -> dict:
    """Parameter groups of the model built on the meta device (see the module text). A vision-language model
    (train/trace_vlm.py): every Linear with its component, the tower's and projector's other parameters apart."""
    import torch
    from transformers import AutoModelForCausalLM

    from train import trace_vlm

    vlm = trace_vlm.is_vlm(cfg)
    try:
        with torch.device("meta"):
            model = trace_vlm.build_meta(cfg) if vlm else AutoModelForCausalLM.from_config(cfg)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001  (ValueError, KeyError, a config the modeling code asserts on)
        what = "image-text-to-text" if vlm else "causal-LM"
        raise TraceError("unsupported", f"{type(cfg).__name__}: transformers builds no {what} model of it "
                                        f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    pp = trace_vlm.parts(model) if vlm else {"llm": [""], "vision": [], "projector": []}
    dims = _dims(cfg.get_text_config() if vlm else cfg)
    head = head_name(model)
    in_linear, groups = set(), {}
    for name, m in model.named_modules():
        shape = _linear_shape(m)
        if shape is None or name == head:
            continue
        if quant == "nf4" and not isinstance(m, torch.nn.Linear):
            raise TraceError("unsupported", f"{name}: a {type(m).__name__} layer (GPT-2 style); the trace quantizes "
                                            "nn.Linear only: plan it unquantized (--recipe lora)")
        key = (name.rpartition(".")[2], *shape, m.bias is not None, trace_vlm.component(name, pp))
        groups[key] = groups.get(key, 0) + 1
        in_linear.update(id(p) for p in m.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    other = {"embed": 0, "lm_head": 0, "norms": 0, **({"vision": 0, "projector": 0} if vlm else {})}
    for name, p in model.named_parameters():  # tied weights once (remove_duplicate)
        if id(p) in in_linear:
            continue
        kind = "embed" if p is emb else ("lm_head" if out is not None and p is out.weight else "norms")
        comp = trace_vlm.component(name, pp)
        other[kind if comp == "llm" else comp] += p.numel()
    layers = _layers(model.get_decoder() if vlm else model, dims["num_layers"])
    layer_params = sum(p.numel() for p in layers[0].parameters()) if layers is not None else 0
    largest = max(p.numel() for p in model.parameters())
    # last: get_peft_model adds adapters in place
    adapted = _lora_modules(model, lora, pp if vlm else None) if lora else []
    return {"model_type": cfg.model_type, "architecture": type(model).__name__, "dims": dims,
            "linears": [{"name": n, "d_in": i, "d_out": o, "bias": b, "count": c, "component": comp}
                        for (n, i, o, b, comp), c in sorted(groups.items())],
            "other_params": other, "layer_params": layer_params, "largest_tensor_params": largest,
            "lora_modules": adapted}


def _lora_modules(model, lora: dict, pp: dict | None = None) -> list[str]:
    """The Linear name suffixes PEFT adapts for these targets (get_peft_model on the meta model); a VLM's on
    its language model only (train/trace_vlm.py lora_regex)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from train.trace_vlm import lora_regex

    t = lora["targets"]
    target = lora_regex(model, pp, t) if pp else ALL_LINEAR if ALL_LINEAR in t else list(t)
    lc = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=target)
    try:
        peft_model = get_peft_model(model, lc)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise TraceError("unsupported", f"LoRA targets {','.join(t)}: {str(e).splitlines()[0][:200]}") from None
    return sorted({n.rpartition(".")[2] for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)})


