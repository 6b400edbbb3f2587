"""Mixtral (Mixtral-8x7B, 8x22B): Mistral's attention with a sparse mixture-of-experts MLP, and the MoE layer
the Qwen MoE families reuse (families/qwen2_moe.py, qwen3_moe.py).

transformers models/mixtral/modeling_mixtral.py (the pinned transformers 5): each decoder layer's MLP is a
MixtralSparseMoeBlock: a router (MixtralTopKRouter, an E x h `nn.Parameter`, not an nn.Linear) picks
`num_experts_per_tok` = k of the `num_local_experts` = E experts per token; the experts are two fused 3-D
parameters (MixtralExperts: gate_up_proj E x 2i x h, down_proj E x h x i), run by transformers
integrations/moe.py grouped_mm_experts_forward (the default `experts_implementation`). transformers 4.x kept
each expert as three nn.Linear (block_sparse_moe.experts.N.w1/w3: h -> i, w2: i -> h) and the router as an
nn.Linear `gate` (`fused_experts` False: that layout, for plans of a machine with transformers 4).

What that means for the plan (docs/estimate.md#model-families):
  * every expert's weights stay resident: parameters, ZeRO partitions and checkpoints count all E experts;
  * bitsandbytes quantizes nn.Linear modules only (transformers integrations/bitsandbytes.py
    replace_with_bnb_linear), so with fused experts the router and the experts stay 16-bit under QLoRA (and
    peft's prepare_model_for_kbit_training upcasts them to fp32 like every other non-quantized weight); with
    the 4.x layout they are 4-bit like the attention;
  * PEFT 0.21 maps the 4.x names onto the fused parameters (peft utils/transformers_weight_conversion.py
    _MOE_TARGET_MODULE_MAPPING): `w1` + `w3` -> a ParamWrapper on gate_up_proj at rank 2r, `w2` -> down_proj,
    `gate` -> the router weight, and "all-linear" adds all of them; a ParamWrapper on an E x out x in
    parameter has A: (r*E) x in and B: out x (r*E), i.e. r*E*(in + out) (parameter_lora_params below);
  * only the routed experts compute: FLOPs per token use k experts (active_matmul_params); decode at batch B
    reads the experts some token of the step routes to (unread_params: uniform, independent routing assumed);
  * activations: the router's fp32 softmax and top-k, the dispatch indices and the k copies per token of
    each expert's intermediate activations (moe_saved_bytes_per_token, measured op by op with
    torch.autograd.graph.saved_tensors_hooks on the pinned grouped_mm path, tests/estimate/test_moe_families.py).
Exact counts are checked on the meta device, and LoRA counts against peft's get_peft_model, by that test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from vramplan.contract import ALL_LINEAR, ContractError, require
from vramplan.estimate.families import LinearGroup, llama, mistral
from vramplan.estimate.families.mistral import MistralSpec

ROLE = "text"
HF_MODEL_TYPES = ("mixtral",)
MOE_PROFILE_FIELDS = {
    "num_experts": (int, True, 1), "experts_per_token": (int, True, 1), "expert_intermediate_size": (int, False, 0),
    "shared_intermediate_size": (int, False, 0), "dense_layers": (int, False, 0), "norm_topk_prob": (bool, False, None),
    "fused_experts": (bool, False, None), "output_router_logits": (bool, False, None),
}
PROFILE_FIELDS = {**mistral.PROFILE_FIELDS, **MOE_PROFILE_FIELDS}
# transformers' MixtralConfig defaults (configuration_mixtral.py)
HF_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096 * 32}
MOE_DEFAULTS = {"num_experts": 8, "k": 2, "norm": True}  # MixtralConfig; the router always renormalises
EXPERT_NAMES = ("w1", "w3", "w2")  # the 4.x per-expert Linears: gate, up, down
INT64, FP32 = 8, 4


@dataclass(frozen=True)
class MoeFields:
    """The mixture-of-experts fields every MoE spec adds to its decoder's (placed first in the bases)."""

    num_experts: int = 8  # E, routed experts per MoE layer
    experts_per_token: int = 2  # k, num_experts_per_tok
    expert_intermediate_size: int = 0  # each expert's width; 0: intermediate_size (Mixtral)
    shared_intermediate_size: int = 0  # an always-on shared expert's width (Qwen2-MoE); 0: none
    dense_layers: int = 0  # layers with a dense MLP of intermediate_size instead (mlp_only_layers, sparse step)
    norm_topk_prob: bool = True  # the router renormalises the top-k probabilities
    fused_experts: bool = True  # transformers 5: 3-D expert parameters; False: 4.x per-expert nn.Linear
    output_router_logits: bool = False  # the load-balancing aux loss keeps every layer's router logits

    @property
    def expert_width(self) -> int:
        return self.expert_intermediate_size or self.intermediate_size

    @property
    def sparse_layers(self) -> int:
        return self.num_layers - self.dense_layers


@dataclass(frozen=True)
class MixtralSpec(MoeFields, MistralSpec):
    """A Mixtral decoder's config: Mistral's fields and the MoE fields."""

    family: ClassVar[str] = "mixtral"


SPEC = MixtralSpec


def from_hf_config(cfg: dict, where: str, prefix: str = "") -> MixtralSpec:
    fields = llama.hf_fields(cfg, where, prefix, HF_DEFAULTS)
    fields.update(attention_bias=False, mlp_bias=False)  # modeling_mixtral.py: bias=False everywhere
    return MixtralSpec(**fields, sliding_window=mistral.read_window(cfg, where, prefix, None),
                       **moe_fields(cfg, where, prefix, fields["num_layers"], "num_local_experts", MOE_DEFAULTS))


def moe_fields(cfg: dict, where: str, prefix: str, layers: int, experts_key: str, defaults: dict) -> dict:
    """The MoeFields of a config.json; `defaults`: the config class's num_experts, num_experts_per_tok,
    moe_intermediate_size, shared_expert_intermediate_size and norm_topk_prob. A layer is sparse unless it is in
    mlp_only_layers or (i + 1) % decoder_sparse_step != 0 (models/qwen2_moe/modeling_qwen2_moe.py
    Qwen2MoeDecoderLayer; Mixtral has neither key: every layer is sparse)."""
    def get(key, kind=int, default=None, lo=1):
        v = require(cfg, key, kind, where, label=prefix + key, min=lo, allow_none=True, default=None)
        return default if v is None else v

    e = get(experts_key, default=get("num_local_experts" if experts_key == "num_experts" else "num_experts",
                                     default=defaults["num_experts"]))  # either key (configs alias them)
    top = get("num_experts_per_tok", default=defaults["k"])
    if top > e:
        raise ContractError(f"{where}: {prefix}num_experts_per_tok: {top} is more than the {e} experts")
    step, dense_only = get("decoder_sparse_step", default=1), get("mlp_only_layers", list, [], None)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in dense_only):
        raise ContractError(f"{where}: {prefix}mlp_only_layers: must list layer indices")
    sparse = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return dict(num_experts=e, experts_per_token=top,
                expert_intermediate_size=get("moe_intermediate_size", default=defaults.get("moe", 0)),
                shared_intermediate_size=get("shared_expert_intermediate_size", default=defaults.get("shared", 0),
                                             lo=0),
                dense_layers=layers - sparse, norm_topk_prob=get("norm_topk_prob", bool, defaults["norm"], None),
                output_router_logits=get("output_router_logits", bool, False, None))


# --- parameters ------------------------------------------------------------------------------------------
def attention_groups(t) -> list[LinearGroup]:
    """q, k, v, o of every layer (Llama's, with the spec's attention_bias)."""
    return llama.linear_groups(t)[:4]


def moe_linear_groups(t, attention: list[LinearGroup], expert_names: tuple[str, str, str]) -> list[LinearGroup]:
    """Every nn.Linear: the attention, dense layers' MLPs, the shared expert and its sigmoid gate (h -> 1),
    and with the 4.x layout each expert's three Linears and the router `gate` (h -> E)."""
    h, i, ie, ish, ls = t.hidden_size, t.intermediate_size, t.expert_width, t.shared_intermediate_size, t.sparse_layers
    out = list(attention)
    if t.dense_layers:
        out += _mlp(h, i, t.dense_layers, ("gate_proj", "up_proj", "down_proj"))
    if ish:
        out += _mlp(h, ish, ls, ("gate_proj", "up_proj", "down_proj"))
        out.append(LinearGroup("llm", "shared_expert_gate", h, 1, False, ls))
    if not t.fused_experts:
        out += _mlp(h, ie, ls * t.num_experts, expert_names)
        out.append(LinearGroup("llm", "gate", h, t.num_experts, False, ls))
    return out


def _mlp(h: int, i: int, count: int, names) -> list[LinearGroup]:
    gate, up, down = names
    return [LinearGroup("llm", gate, h, i, False, count), LinearGroup("llm", up, h, i, False, count),
            LinearGroup("llm", down, i, h, False, count)]


def expert_params(t) -> int:
    """All routed experts' weights: E x 3 x h x i per MoE layer."""
    return t.sparse_layers * t.num_experts * 3 * t.hidden_size * t.expert_width


def moe_other_params(t, base: dict[str, int]) -> dict[str, int]:
    """The decoder's other tensors plus, with fused experts, the 3-D experts and the router weights."""
    if not t.fused_experts:
        return base
    return {**base, "experts": expert_params(t), "router": t.sparse_layers * t.num_experts * t.hidden_size}


def linear_groups(t: MixtralSpec) -> list[LinearGroup]:
    return moe_linear_groups(t, attention_groups(t), EXPERT_NAMES)


def other_params(t: MixtralSpec) -> dict[str, int]:
    return moe_other_params(t, llama.other_params(t))


def moe_layer_params(t, attention: list[LinearGroup], per_layer_norms: int) -> int:
    """One MoE decoder layer (the largest kind: ZeRO-3 gathers and device_map split by it): its attention,
    norms, shared expert and gate, router and all E experts (the same count in either layout)."""
    h, ish = t.hidden_size, t.shared_intermediate_size
    attn = sum(g.params for g in attention) // t.num_layers
    shared = 3 * h * ish + h if ish else 0
    return attn + per_layer_norms + shared + t.num_experts * (3 * h * t.expert_width + h)


def layer_params(t: MixtralSpec) -> int:
    return moe_layer_params(t, attention_groups(t), 2 * t.hidden_size)


def largest_tensor_params(t) -> int:
    """The largest single weight: a fused gate_up_proj (E x 2i x h) when larger than the embeddings."""
    fused = t.num_experts * 2 * t.expert_width * t.hidden_size if t.fused_experts else 0
    return max(llama.largest_tensor_params(t), fused)


def fused_adapted(t, lora, mapping=None) -> set[str]:
    """The fused parameters PEFT adapts (module text): "gate_up" when both of its halves are named (PEFT
    refuses one alone), "down", "router" (`gate`); all of them for "all-linear". mapping: the 4.x names of
    gate, up and down that PEFT maps for this model_type; () when it maps none (qwen2_moe)."""
    if lora is None or not t.fused_experts or not t.sparse_layers or mapping == ():
        return set()
    gate, up, down = tuple(mapping or EXPERT_NAMES)
    names = set(lora.targets)
    every = ALL_LINEAR in names
    return ({"gate_up"} if every or {gate, up} <= names else set()) | (
        {"down"} if every or down in names else set()) | ({"router"} if every or "gate" in names else set())


def parameter_lora_params(t, lora, mapping=None) -> int:
    """LoRA on the fused parameters: gate_up_proj at rank 2r, r*E*(in + out) each (module text)."""
    on, h, ie, e = fused_adapted(t, lora, mapping), t.hidden_size, t.expert_width, t.num_experts
    if not on:
        return 0
    per = (2 * lora.r * e * (h + 2 * ie) if "gate_up" in on else 0) + (
        lora.r * e * (ie + h) if "down" in on else 0) + (lora.r * (h + e) if "router" in on else 0)
    return per * t.sparse_layers


# --- activations (bytes per token) -----------------------------------------------------------------------
def moe_block_bytes_per_token(t, mode: str, routing_weight_bytes: int, residual_bytes: int = 0) -> float:
    """What one MoE block saves for backward per token (16-bit compute), measured op by op on the pinned
    grouped_mm path (transformers integrations/moe.py grouped_mm_experts_forward) and the router:
      router: the fp32 softmax (4E), the top-k indices (int64, 8k), with norm_topk_prob the sum and the
        renormalised values kept by the in-place division (4 + 4k);
      dispatch: the sort permutation and its gather index (int64, 2 x 8k), the inverse permutation (8k), the
        routing weight per (token, expert) pair kept by the weighting multiply (routing_weight_bytes x k);
      experts, per routed copy (k per token): the gate_up output (4i, kept by SiLU and the gate product), the
        SiLU output (2i), the expert output kept by the weighting multiply (2h);
      trainable experts ("full") add the gathered input (2h) and the down projection's input (2i) per copy.
    With an fp32 residual (plain-PyTorch k-bit) the fused experts are fp32 too (peft's
    prepare_model_for_kbit_training upcast them) and grouped_mm runs in their dtype: the expert tensors double.
    transformers 4.x's per-expert loop saves the same tensors within a few bytes per copy (derived, not traced).
    """
    e, k, i, h = t.num_experts, t.experts_per_token, t.expert_width, t.hidden_size
    router = FP32 * e + INT64 * k + ((FP32 + FP32 * k) if t.norm_topk_prob else 0)
    dispatch = 3 * INT64 * k + routing_weight_bytes * k
    experts = k * (6 * i + 2 * h + (2 * h + 2 * i if mode == "full" else 0))
    if residual_bytes > 2 and t.fused_experts and mode != "full":
        experts *= residual_bytes / 2
    return router + dispatch + experts


def moe_saved_bytes_per_token(t, base, mode: str, lora, attn: str, seq: int, compute_bytes: int,
                              kbit_saves_inputs: bool, residual_bytes: int, adapter_casts: bool,
                              routing_weight_bytes: int, linear_names: tuple[str, ...], mapping=None) -> float:
    """Mean over the layers: `base` (the decoder family's saved_bytes_per_token) on the layer without its
    routed experts (the shared expert as its MLP, or none), plus the MoE block; dense layers are `base`'s.
    LoRA targets are narrowed to the Linear modules the layer has (`linear_names`); adapters PEFT puts on fused
    parameters keep their inputs (the gathered copies 2h for gate_up, the down input 2i, the router's 2h) per
    token and the merged weight per layer (saved_bytes_per_layer)."""
    narrowed = _narrow(lora, linear_names)
    args = (mode, narrowed, attn, seq, compute_bytes, kbit_saves_inputs, residual_bytes, adapter_casts)
    sparse = base(replace(t, intermediate_size=t.shared_intermediate_size), *args)
    block = moe_block_bytes_per_token(t, mode, routing_weight_bytes, residual_bytes)
    if t.shared_intermediate_size:
        block += 2 + 2 * t.hidden_size  # the shared expert's sigmoid gate and the output it scales
    if mode != "full":  # adapted fused weights need their inputs for the adapters' gradients
        on, k = fused_adapted(t, lora, mapping), t.experts_per_token
        block += k * ((2 * t.hidden_size if "gate_up" in on else 0) + (2 * t.expert_width if "down" in on else 0))
        block += 2 * t.hidden_size if "router" in on else 0
    if compute_bytes != 2:
        block *= compute_bytes / 2
    if t.output_router_logits:
        block += 2 * t.num_experts  # the aux loss's softmax over every layer's logits, kept for backward
    per = (sparse + block) * t.sparse_layers
    if t.dense_layers:
        per += base(replace(t, dense_layers=0), *args) * t.dense_layers
    return per / t.num_layers


def _narrow(lora, names: tuple[str, ...]):
    """The LoRA spec with only the targets that are nn.Linear modules of a layer ("all-linear" -> all of them)."""
    if lora is None:
        return None
    targets = tuple(names) if ALL_LINEAR in lora.targets else tuple(n for n in lora.targets if n in names)
    return replace(lora, targets=targets)


def saved_bytes_per_token(t: MixtralSpec, mode: str, lora, attn: str, seq: int, compute_bytes: int = 2,
                          kbit_saves_inputs: bool = False, residual_bytes: int = 0,
                          adapter_casts: bool = False) -> float:
    names = ("q_proj", "k_proj", "v_proj", "o_proj") + (() if t.fused_experts else (*EXPERT_NAMES, "gate"))
    return moe_saved_bytes_per_token(t, llama.saved_bytes_per_token, mode, lora, attn, seq, compute_bytes,
                                     kbit_saves_inputs, residual_bytes, adapter_casts, FP32, names, EXPERT_NAMES)


def saved_bytes_per_layer(t, lora, compute_bytes: int = 2, mapping=None) -> int:
    """Saved bytes per layer that do not scale with tokens: PEFT's ParamWrapper merges W + B@A through a torch
    parametrization each forward (peft tuners/lora/layer.py ParamWrapper._activate_lora) and the matmul keeps the
    merged 16-bit weight for backward, one per adapted fused parameter (measured with the per-token terms by
    tests/estimate/test_moe_families.py)."""
    on, h, ie, e = fused_adapted(t, lora, mapping), t.hidden_size, t.expert_width, t.num_experts
    b = (2 * e * h * ie if "gate_up" in on else 0) + (e * h * ie if "down" in on else 0) + (
        e * h if "router" in on else 0)
    return int(b * compute_bytes * t.sparse_layers / t.num_layers)


def dispatch_bytes_per_token(t, routing_weight_bytes: int = FP32) -> float:
    """A MoE layer's forward buffers beyond what it saves, live together at the block's end (derived from the
    code, not traced). Fused (integrations/moe.py grouped_mm_experts_forward, frozen experts): the gathered
    inputs (2h per copy, held by the function until it returns), the weighted outputs in the routing weights'
    dtype and their un-permuted copy (2 x routing_weight_bytes x h per copy), their sum (routing_weight_bytes x h).
    transformers 4.x's loop: the output buffer (2h) and one expert's tensors at a time (k/E of the tokens)."""
    k, h = t.experts_per_token, t.hidden_size
    if not t.fused_experts:
        return 2 * h + k / t.num_experts * (4 * h + 6 * t.expert_width)
    return 2 * k * h + 2 * routing_weight_bytes * k * h + routing_weight_bytes * h


def checkpointed_bytes_per_token(t, compute_bytes: int) -> float:
    """The layer input, plus the aux loss's per-layer softmax (kept outside the checkpointed layers)."""
    return compute_bytes * t.hidden_size + (2 * t.num_experts if t.output_router_logits else 0)


# --- FLOPs and inference -----------------------------------------------------------------------------------
def active_matmul_params(t, total_linear: int) -> int:
    """Decoder matmul weights one token multiplies by: `total_linear` (every nn.Linear), plus with fused
    experts the router, minus the experts it is not routed to; k of E experts per MoE layer."""
    ls, e, k = t.sparse_layers, t.num_experts, t.experts_per_token
    per_expert = 3 * t.hidden_size * t.expert_width
    if t.fused_experts:
        return total_linear + ls * e * t.hidden_size + ls * k * per_expert
    return total_linear - ls * (e - k) * per_expert


def unread_params(t, batch: int) -> float:
    """Expert weights a decode step does not read: with B sequences a layer reads the experts any of the B
    tokens is routed to, E * (1 - (1 - k/E)^B) of them in expectation under uniform, independent routing."""
    e, k = t.num_experts, t.experts_per_token
    hit = e * (1 - (1 - k / e) ** max(1, batch))
    return t.sparse_layers * (e - hit) * 3 * t.hidden_size * t.expert_width


def active_intermediate_size(t) -> float:
    """MLP width one token's elementwise ops touch, per layer on average: k experts + the shared expert."""
    sparse = t.experts_per_token * t.expert_width + t.shared_intermediate_size
    return (sparse * t.sparse_layers + t.intermediate_size * t.dense_layers) / t.num_layers


def prefill_bytes_per_token(t, dtype_bytes: int) -> float:
    """One layer's prefill temporaries with the k routed copies of the expert MLP."""
    return (t.hidden_size * 4 + active_intermediate_size(t) * 3 + t.experts_per_token * t.hidden_size) * dtype_bytes


kv_cache_tokens = mistral.kv_cache_tokens
window_mask_bytes_per_token = mistral.window_mask_bytes_per_token
chat_template = llama.chat_template
final_norm_bytes_per_token = llama.final_norm_bytes_per_token
attention_flops_per_token = llama.attention_flops_per_token
kv_bytes_per_token = llama.kv_bytes_per_token
