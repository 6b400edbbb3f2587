"""Truth test for the decoder families beside Llama (families/mistral.py, qwen2.py, qwen3.py): parameter counts
by group equal transformers' model built on the meta device from the same config.json, and the KV cache follows
the sliding window (docs/estimate.md#checked-against-reality)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_params import measured, measured_linear_groups  # noqa: E402
from vramplan.estimate.params import count_params, decoder_layer_params, largest_layer_params, linear_groups  # noqa: E402
from vramplan.inputs.model_dir import load_model_dir  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=256)
CASES = {
    "mistral": (transformers.MistralConfig, {}, "MistralForCausalLM"),
    "mistral-headdim-nowindow": (transformers.MistralConfig, {"head_dim": 32, "sliding_window": None},
                                 "MistralForCausalLM"),
    "qwen2": (transformers.Qwen2Config, {}, "Qwen2ForCausalLM"),
    "qwen2.5-tied-window": (transformers.Qwen2Config, {"tie_word_embeddings": True, "use_sliding_window": True,
                                                       "sliding_window": 16, "max_window_layers": 1},
                            "Qwen2ForCausalLM"),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 24}, "Qwen3ForCausalLM"),
    "qwen3-tied-bias": (transformers.Qwen3Config, {"tie_word_embeddings": True, "attention_bias": True},
                        "Qwen3ForCausalLM"),
}


def config_dir(tmp_path, name):
    cls, extra, _ = CASES[name]
    cfg = cls(**TINY, **extra)
    cfg.save_pretrained(tmp_path)
    return cfg


@pytest.mark.parametrize("name", list(CASES))
def test_counts_equal_meta_device_instantiation(tmp_path, name):
    cfg = config_dir(tmp_path, name)
    spec = load_model_dir(tmp_path)  # a config.json dir, no weights
    assert spec.vision is None and spec.text.family == cfg.model_type
    with torch.device("meta"):
        model = getattr(transformers, CASES[name][2])(cfg)
    assert_exact_counts(spec, model, measured(model))


def assert_exact_counts(spec, model, theirs):
    """Totals, groups, one layer, the largest tensor and every Linear of `spec` equal the meta-device model's
    (`theirs`: its parameters by group). Shared with tests/estimate/test_families_gemma_phi.py."""
    ours = count_params(spec)
    assert ours.total == sum(p.numel() for p in model.parameters())
    assert (ours.llm_linear, ours.llm_embed, ours.llm_norms, ours.llm_lm_head) == (
        theirs.get("llm_linear", 0), theirs["llm_embed"], theirs["llm_norms"], theirs.get("lm_head", 0))
    assert decoder_layer_params(spec) == sum(p.numel() for p in model.model.layers[0].parameters())
    assert largest_layer_params(spec) == max(p.numel() for p in model.parameters())
    groups = Counter({(g.component, g.name, g.d_in, g.d_out, g.bias): g.count for g in linear_groups(spec)})
    assert groups == measured_linear_groups(model)


def test_config_defaults_are_the_config_classes():
    """Keys a config.json omits take the family's config class defaults, not Llama's."""
    from vramplan.estimate.families import mistral, qwen2, qwen3

    for mod, cls in ((mistral, transformers.MistralConfig), (qwen2, transformers.Qwen2Config),
                     (qwen3, transformers.Qwen3Config)):
        t, c = mod.from_hf_config({"model_type": cls.model_type}, "config.json"), cls()
        assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_attention_heads, t.num_key_value_heads,
                t.vocab_size, t.d_head) == (c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                                            c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
                                            getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _cache_tokens(cfg, cls_name, context):
    """Tokens per layer transformers' DynamicCache holds after a `context`-token prefill (real tiny model)."""
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (1, context)), use_cache=True)
    return [layer.keys.shape[-2] for layer in out.past_key_values.layers]


@pytest.mark.parametrize("name", ["mistral", "qwen2.5-tied-window", "qwen2"])
def test_kv_cache_tokens_follow_the_window(tmp_path, name):
    from vramplan.estimate.families import module_for

    cls, extra, cls_name = CASES[name]
    extra = {**extra, "sliding_window": 16} if name == "mistral" else extra
    cfg = cls(**TINY, **extra)
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    for context in (8, 40):
        held = _cache_tokens(cfg, cls_name, context)
        ours = module_for(spec.text).kv_cache_tokens(spec.text, context)
        # transformers keeps W - 1 tokens once past the window; the estimate counts W (one token per layer more)
        assert sum(held) / len(held) <= ours <= sum(held) / len(held) + 1
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == spec.text.family


def _estimate(args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-m", "vramplan", "estimate", *args, "--json"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["data"]


def test_profile_free_text_only_dirs_plan_and_say_their_family(tmp_path):
    """`--model DIR` with only a Mistral/Qwen2 config.json: training and inference plans name the family; the
    inference KV cache stops growing at Mistral's window."""
    transformers.MistralConfig().save_pretrained(tmp_path / "mistral")  # 7B defaults, sliding_window 4096
    transformers.Qwen2Config(tie_word_embeddings=True).save_pretrained(tmp_path / "qwen2")
    train = _estimate(["--model", str(tmp_path / "qwen2"), "--gpus", "1x80GB"])
    assert train["model"]["family"] == "qwen2" and train["model"]["image_tokens"] == 0 and train["pick"] is not None
    kv = {}
    for context in (4096, 32768):
        d = _estimate(["--model", str(tmp_path / "mistral"), "--gpus", "1x80GB", "--task", "infer",
                       "--context", str(context)])
        assert d["model"]["family"] == "mistral"
        kv[context] = d["candidates"][0]["vram_breakdown"]["kv_cache"]
    assert kv[4096] == kv[32768] == 2 * 8 * 128 * 2 * 4096 * 32  # K and V, 8 kv heads x 128, bf16, 32 layers


LLM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _layer_saved_bytes(name, mode, lora, b, s):
    cls, extra, cls_name = CASES[name]
    return layer_saved_bytes(lambda layers: getattr(transformers, cls_name)(
        cls(**{**TINY, "num_hidden_layers": layers}, **extra, attn_implementation="sdpa")), mode, lora, b, s)


def layer_saved_bytes(build, mode, lora, b, s, attention_mask=None):
    """saved(2 layers) - saved(1 layer) of the real bf16 model `build(layers)`, as
    tests/estimate/test_activation_truth.py does (dropout as the CUDA kernel allocates it: a 1-byte mask).
    attention_mask: the (b, s) padding mask the trainer's collate gives (None: no mask, no padding).
    Shared with tests/estimate/test_families_gemma_phi.py and tests/estimate/test_padding_mask.py."""
    peft = pytest.importorskip("peft")
    from train.trace_fake import cuda_dropout

    from .act_measure import saved_bytes

    out = []
    with cuda_dropout():
        for layers in (1, 2):
            torch.manual_seed(0)
            m = build(layers).to(torch.bfloat16)
            m.requires_grad_(mode == "full")
            if mode == "lora":
                m = peft.get_peft_model(m, peft.LoraConfig(r=lora.r, lora_alpha=16, lora_dropout=lora.dropout,
                                                           target_modules=list(lora.targets)),
                                        autocast_adapter_dtype=False).to(torch.bfloat16)
            inner = m.base_model.model.model if mode == "lora" else m.model
            m.train()
            emb = torch.randn(b, s, m.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
            out.append(saved_bytes(lambda: inner(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state,
                                   list(m.parameters())))
    return out[1] - out[0]


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode,lr", [("full", None), ("lora", (8, 0.05)), ("frozen", None)])
def test_layer_activation_bytes_against_saved_tensors(tmp_path, name, mode, lr):
    from vramplan.estimate.activations import llm_layer_bytes_per_token
    from vramplan.estimate.specs import LoraSpec

    lora = LoraSpec(r=lr[0], alpha=16, dropout=lr[1], targets=tuple(LLM_LINEARS)) if lr else None
    config_dir(tmp_path, name)
    spec = load_model_dir(tmp_path).text
    b, s = 2, 48
    measured = _layer_saved_bytes(name, mode, lora, b, s)
    predicted = llm_layer_bytes_per_token(spec, mode, lora, "sdpa", s) * b * s
    assert predicted == pytest.approx(measured, rel=0.02), (predicted, measured)
