"""Truth tests for the mixture-of-experts families (families/mixtral.py, qwen2_moe.py, qwen3_moe.py): parameter
counts equal transformers' models on the meta device, LoRA counts equal peft's get_peft_model on them (the fused
3-D experts as PEFT 0.21 targets them), the MoE layer's saved bytes equal torch.autograd.graph.saved_tensors_hooks
on the real bf16 layer, and a hub id plans (docs/estimate.md#model-families)."""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_params import measured_linear_groups  # noqa: E402
from vramplan.estimate.params import count_params, decoder_layer_params, largest_layer_params, linear_groups  # noqa: E402
from vramplan.inputs.model_dir import load_model_dir  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)
CASES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM"),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    shared_expert_intermediate_size=80), "Qwen2MoeForCausalLM"),
    "qwen2_moe-dense-layer": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=3,
                                                                moe_intermediate_size=48, norm_topk_prob=True,
                                                                shared_expert_intermediate_size=80, mlp_only_layers=[0],
                                                                tie_word_embeddings=True), "Qwen2MoeForCausalLM"),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                    head_dim=24, norm_topk_prob=True), "Qwen3MoeForCausalLM"),
}


def _model(name, layers=None, meta=True):
    cls, extra, cls_name = CASES[name]
    cfg = cls(**{**TINY, **({"num_hidden_layers": layers} if layers else {})}, **extra)
    if meta:
        with torch.device("meta"):
            return cfg, getattr(transformers, cls_name)(cfg)
    torch.manual_seed(0)
    return cfg, getattr(transformers, cls_name)(cfg)


def _spec(tmp_path, name, layers=None):
    cfg, _ = _model(name, layers)
    cfg.save_pretrained(tmp_path)
    return load_model_dir(tmp_path)  # a config.json dir, no weights


@pytest.mark.parametrize("name", list(CASES))
def test_counts_equal_meta_device_instantiation(tmp_path, name):
    spec = _spec(tmp_path, name)
    _, model = _model(name)
    assert spec.text.family == model.config.model_type
    ours = count_params(spec)
    linear = sum(p.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and not n.endswith("lm_head") for p in m.parameters())
    assert ours.total == sum(p.numel() for p in model.parameters())
    assert ours.llm_linear == linear  # the fused experts and the router are not nn.Linear: not quantized
    assert decoder_layer_params(spec) == max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    assert largest_layer_params(spec) == max(p.numel() for p in model.parameters())
    assert Counter({(g.component, g.name, g.d_in, g.d_out, g.bias): g.count for g in linear_groups(spec)}) == (
        measured_linear_groups(model))


TARGETS = {
    "mixtral": ["all-linear", ("q_proj", "v_proj"), ("w1", "w3", "w2"), ("w2", "gate", "o_proj")],
    "qwen2_moe": ["all-linear", ("gate_proj", "up_proj", "down_proj")],
    "qwen3_moe": ["all-linear", ("gate_proj", "up_proj", "down_proj", "k_proj"), ("down_proj",)],
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_lora_counts_equal_peft(tmp_path, name):
    """peft maps the 4.x expert names onto the fused parameters (mixtral, qwen3_moe) or leaves them (qwen2_moe)."""
    peft = pytest.importorskip("peft")
    from vramplan.estimate.param_groups import param_groups
    from vramplan.estimate.specs import LoraSpec
    from vramplan.inputs.profiles import load_recipe

    spec = _spec(tmp_path, name)
    base = load_recipe("qlora")
    for targets in TARGETS[name]:
        lora = LoraSpec(r=4, alpha=8, dropout=0.0, targets=targets)
        model = peft.get_peft_model(_model(name)[1], peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets if isinstance(targets, str) else list(targets)))
        theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ours = param_groups(spec, _replace(base, llm_lora=lora)).trainable_llm_lora
        assert ours == theirs, (targets, ours, theirs)


def _replace(recipe, **kw):
    from dataclasses import replace

    return replace(recipe, **kw)


def _moe_layer_saved_bytes(name, mode, b, s, lora=None):
    """saved(2 layers) - saved(1 layer) of the real bf16 model (tests/estimate/test_activation_truth.py's way)."""
    from .act_measure import saved_bytes

    out = []
    for layers in (1, 2):
        _, m = _model(name, layers, meta=False)
        m = m.to(torch.bfloat16)
        m.requires_grad_(mode == "full")
        if lora is not None:
            import peft

            targets = lora.targets[0] if lora.targets == ("all-linear",) else list(lora.targets)
            m = peft.get_peft_model(m, peft.LoraConfig(r=lora.r, lora_alpha=16, lora_dropout=lora.dropout,
                                                       target_modules=targets),
                                    autocast_adapter_dtype=False).to(torch.bfloat16)
        inner = m.base_model.model.model if lora is not None else m.model
        m.train()
        torch.manual_seed(1)
        emb = torch.randn(b, s, TINY["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
        out.append(saved_bytes(lambda: inner(inputs_embeds=emb).last_hidden_state, list(m.parameters())))
    return out[1] - out[0]


@pytest.mark.parametrize("name,mode,targets", [
    ("mixtral", "frozen", None), ("mixtral", "full", None), ("mixtral", "lora", ("q_proj", "w1", "w3", "w2")),
    ("qwen2_moe", "lora", "all-linear"), ("qwen2_moe", "full", None), ("qwen3_moe", "lora", "all-linear")])
def test_moe_layer_activation_bytes_against_saved_tensors(tmp_path, name, mode, targets):
    """Per token (router, dispatch, k copies of the expert activations) and, for adapters PEFT puts on the
    fused experts, per layer (the merged weight)."""
    from vramplan.estimate.activations import llm_layer_bytes_per_token
    from vramplan.estimate.families import module_for
    from vramplan.estimate.specs import LoraSpec

    lora = LoraSpec(r=8, alpha=16, dropout=0.0, targets=targets) if targets else None
    spec = _spec(tmp_path, name, layers=1).text
    b, s = 2, 48
    measured = _moe_layer_saved_bytes(name, "frozen" if mode == "lora" else mode, b, s, lora)
    predicted = llm_layer_bytes_per_token(spec, mode, lora, "sdpa", s) * b * s + module_for(
        spec).saved_bytes_per_layer(spec, lora)
    assert predicted == pytest.approx(measured, rel=0.02), (predicted, measured)


def test_transformers_4_layout_quantizes_and_adapts_every_expert(tmp_path):
    """--transformers-version 4.x: one nn.Linear per expert (w1/w3/w2) and the router `gate`, all 4-bit under
    QLoRA and adapted per expert; 5.x: the fused experts stay 16-bit."""
    from vramplan.estimate.param_groups import param_groups
    from vramplan.estimate.specs import LoraSpec
    from vramplan.inputs.profiles import load_recipe
    from vramplan.plan.moe_layout import resolve_expert_layout
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.resolve import Context

    spec = _spec(tmp_path, "mixtral")
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, targets=("w1", "w3", "w2"))
    rec = _replace(load_recipe("qlora"), llm_lora=lora)
    h, i, e, L = 64, 96, 4, 2
    g = {}
    for ver in ("4.45.2", "5.23.0"):
        ctx = Context()
        m = resolve_expert_layout(EstimateOptions(transformers_version=ver), spec, ctx)
        assert f"transformers {ver} (--transformers-version)" in ctx.assumptions[0]
        g[ver] = param_groups(m, rec)
    attention = L * (64 * 64 * 2 + 64 * 32 * 2)
    assert g["4.45.2"].quantized_params == attention + L * e * (3 * h * i + h)
    assert g["4.45.2"].trainable_llm_lora == L * e * 3 * 4 * (h + i)
    assert g["5.23.0"].quantized_params == attention
    assert g["4.45.2"].total_params == g["5.23.0"].total_params


def test_flops_use_the_routed_experts_and_decode_reads_them():
    """Training FLOPs per token count k of E experts, weight reads all of them; decode at batch 1 reads k."""
    from vramplan.estimate.families import mixtral
    from vramplan.estimate.specs import ModelSpec
    from vramplan.estimate.timing_flops import llm_matmul_params

    t = mixtral.from_hf_config({"model_type": "mixtral"}, "config.json")  # Mixtral-8x7B's shape
    m = ModelSpec("mixtral", "test", t, None, None)
    expert = 3 * 4096 * 14336
    assert count_params(m).total == 46_702_792_704  # Mixtral-8x7B's parameter count
    assert llm_matmul_params(m) - llm_matmul_params(m, active=True) == 32 * 6 * expert
    assert mixtral.unread_params(t, 1) == pytest.approx(32 * 6 * expert)
    assert mixtral.unread_params(t, 64) < 0.01 * 32 * expert


def test_hub_id_plans_a_moe_model(tmp_path, monkeypatch):
    """A MoE repo served by the local hub (tests/hub_server.py) plans with the exact counts of its local dir."""
    pytest.importorskip("huggingface_hub")
    from tests.hub_server import Hub
    from tests.test_hub import online
    from vramplan.inputs.model_dir import resolve_model

    _, model = _model("qwen3_moe", meta=False)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "repo")
    with Hub({"org/tiny-qwen3-moe": tmp_path / "repo"}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path / "vp"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        online(monkeypatch, True)
        spec = resolve_model("org/tiny-qwen3-moe")
        assert h.weight_bytes == 0
    assert spec.text.family == "qwen3_moe"
    assert count_params(spec) == count_params(load_model_dir(tmp_path / "repo"))
    assert count_params(spec).total == sum(p.numel() for p in model.parameters())


def test_transformers_version_flag_is_checked():
    from vramplan.errors import UsageError
    from vramplan.plan.request import EstimateOptions

    with pytest.raises(UsageError, match="--transformers-version: must be a release number"):
        EstimateOptions(transformers_version="five")
