"""Truth test for the Gemma (1, 2, 3-text) and Phi-3/4 families (families/gemma.py, families/phi3.py): parameter
counts by group equal transformers' model built on the meta device from the same config.json, the activation
coefficients equal saved_tensors_hooks on the real bf16 layers (2%), the KV cache follows the sliding layers, the
final soft-cap's extra logits copy is measured, and a hub id plans (docs/estimate.md#checked-against-reality)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.estimate.test_families import _cache_tokens, assert_exact_counts, layer_saved_bytes  # noqa: E402
from vramplan.estimate.families import module_for  # noqa: E402
from vramplan.estimate.params import count_params  # noqa: E402
from vramplan.estimate.specs import LoraSpec  # noqa: E402
from vramplan.inputs.model_dir import load_model_dir  # noqa: E402

# distinct h, i, q (= heads x head_dim), kv so that each coefficient shows
TINY = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, vocab_size=320, max_position_embeddings=256)
PHI = {**{k: v for k, v in TINY.items() if k != "head_dim"}, "pad_token_id": 0, "eos_token_id": 0}  # head_dim 16
CASES = {
    "gemma": (transformers.GemmaConfig, TINY, {}, "GemmaForCausalLM"),
    "gemma-bias-untied": (transformers.GemmaConfig, TINY, {"attention_bias": True, "tie_word_embeddings": False},
                          "GemmaForCausalLM"),
    "gemma2": (transformers.Gemma2Config, TINY, {"sliding_window": 64}, "Gemma2ForCausalLM"),
    "gemma3": (transformers.Gemma3TextConfig, TINY, {"sliding_window": 64}, "Gemma3ForCausalLM"),
    "phi3": (transformers.Phi3Config, PHI, {}, "Phi3ForCausalLM"),
    "phi4-mini-tied-window": (transformers.Phi3Config, PHI, {"tie_word_embeddings": True, "sliding_window": 16,
                                                             "partial_rotary_factor": 0.75}, "Phi3ForCausalLM"),
}
FAMILY = {"gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3"}


def measured(model) -> Counter:
    """Parameters by group, each module's own (tied ones listed once): the Linears by type, not by name."""
    out: Counter = Counter()
    seen = set()
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            kind = ("lm_head" if name.endswith("lm_head") else "llm_embed" if "embed_tokens" in name
                    else "llm_linear" if isinstance(mod, torch.nn.Linear) else "llm_norms")
            out[kind] += p.numel()
    return out


def make_config(name, **over):
    cls, tiny, extra, _ = CASES[name]
    return cls(**{**tiny, **extra, **over})


@pytest.mark.parametrize("name", list(CASES))
def test_counts_equal_meta_device_instantiation(tmp_path, name):
    cfg = make_config(name)
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)  # a config.json dir, no weights
    assert spec.vision is None and spec.text.family == FAMILY[cfg.model_type]
    assert spec.chat_template == "vicuna_v1"  # neither family has a template vramplan knows: the generic
    with torch.device("meta"):
        model = getattr(transformers, CASES[name][3])(cfg)
    assert_exact_counts(spec, model, measured(model))


def test_config_defaults_are_the_config_classes():
    """Keys a config.json omits take the family's config class defaults (head_dim 256, tied, 256K vocabulary)."""
    from vramplan.estimate.families import gemma, phi3

    for mod, cls in ((gemma, transformers.GemmaConfig), (gemma, transformers.Gemma2Config),
                     (gemma, transformers.Gemma3TextConfig), (phi3, transformers.Phi3Config)):
        t, c = mod.from_hf_config({"model_type": cls.model_type}, "config.json"), cls()
        assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_attention_heads, t.num_key_value_heads,
                t.vocab_size, t.d_head, t.tie_word_embeddings) == (
            c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            c.tie_word_embeddings)
        types = getattr(c, "layer_types", None) or []
        if mod is gemma:
            assert t.sliding_layers == sum(x == "sliding_attention" for x in types)
            assert t.sliding_window == (c.sliding_window if types else 0)
        else:
            assert t.sliding_window == (c.sliding_window or 0)
    g2 = gemma.from_hf_config({"model_type": "gemma2"}, "config.json")
    assert g2.attn_softcap and g2.final_softcap and g2.sandwich_norms and not g2.qk_norm
    g3 = gemma.from_hf_config({"model_type": "gemma3_text", "sliding_window_pattern": 2, "num_hidden_layers": 4},
                              "config.json")
    assert g3.qk_norm and not g3.final_softcap and g3.sliding_layers == 2


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "phi4-mini-tied-window"])
def test_kv_cache_tokens_follow_the_sliding_layers(tmp_path, name):
    cfg = make_config(name, num_hidden_layers=6, sliding_window=16)
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    for context in (8, 40):
        held = _cache_tokens(cfg, CASES[name][3], context)
        ours = module_for(spec.text).kv_cache_tokens(spec.text, context)
        # transformers keeps W - 1 tokens once past the window; the estimate counts W (one token per layer more)
        assert sum(held) / len(held) <= ours <= sum(held) / len(held) + 1, (held, ours)


GEMMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI_LINEARS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("name,mode,lr", [
    (name, mode, lr) for name in ("gemma", "gemma2", "gemma3", "phi3")
    for mode, lr in (("full", None), ("lora", (8, 0.05)), ("frozen", None), ("lora", (4, 0.0)))
    if lr != (4, 0.0) or name in ("gemma2", "phi3")])  # no dropout: eager o_proj input, fused inputs
def test_layer_activation_bytes_against_saved_tensors(tmp_path, name, mode, lr):
    """gemma2 runs eager (no SDPA path); the window (64) covers the sequence, so SDPA takes no explicit mask."""
    from vramplan.estimate.activations import llm_layer_bytes_per_token

    linears = PHI_LINEARS if name == "phi3" else GEMMA_LINEARS
    # without dropout, a subset with o_proj: the adapters' shared inputs
    subset = ("qkv_proj", "o_proj", "down_proj") if name == "phi3" else ("k_proj", "o_proj", "up_proj", "down_proj")
    targets = tuple(linears) if not lr or lr[1] else subset
    lora = LoraSpec(r=lr[0], alpha=16, dropout=lr[1], targets=targets) if lr else None
    make_config(name).save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path).text
    b, s = 2, 48
    cls = getattr(transformers, CASES[name][3])
    measured_bytes = layer_saved_bytes(lambda n: cls(make_config(name, num_hidden_layers=n)), mode, lora, b, s)
    predicted = llm_layer_bytes_per_token(spec, mode, lora, "sdpa", s) * b * s
    if name == "phi3" and (mode == "full" or (lora and not lora.dropout and "o_proj" in lora.targets)):
        predicted += 2 * spec.q_dim * b * s  # the CPU-only copy of SDPA's output (families/phi3.py)
    assert predicted == pytest.approx(measured_bytes, rel=0.02), (predicted, measured_bytes)


def test_final_softcap_keeps_one_more_logits_copy():
    """Gemma 2's final soft-cap: the tanh output (2 B per logit) is saved for backward on top of what the plain
    lm_head saves; activation_bytes adds it to both loss peaks."""
    from vramplan.estimate.activations import LOGIT_FORWARD_BYTES, LOGIT_PEAK_BYTES, activation_bytes

    from .act_measure import saved_bytes

    b, s, got = 2, 16, {}
    for cap in (None, 30.0):
        torch.manual_seed(0)
        m = transformers.Gemma2ForCausalLM(make_config("gemma2", num_hidden_layers=1,
                                                       final_logit_softcapping=cap)).to(torch.bfloat16)
        m.requires_grad_(False)
        emb = torch.randn(b, s, TINY["hidden_size"], dtype=torch.bfloat16, requires_grad=True)
        got[cap] = saved_bytes(lambda: m(inputs_embeds=emb).logits, list(m.parameters()))
    assert got[30.0] - got[None] == 2 * b * s * TINY["vocab_size"]
    t = load_spec("gemma2")
    act = activation_bytes(t, None, micro_batch=1, seq=10, images_per_sample=0, llm_mode="lora", llm_lora=None,
                           vision_lora=None, grad_ckpt=True)
    assert act.logits_peak == (LOGIT_PEAK_BYTES + 2) * 10 * t.vocab_size
    assert act.logits_forward == (LOGIT_FORWARD_BYTES + 2) * 10 * t.vocab_size
    assert module_for(t).loss_extra_bytes_per_logit(load_spec("gemma"), 2) == 0


def load_spec(name):
    from vramplan.estimate.families import gemma

    return gemma.from_hf_config(make_config(name).to_dict(), "config.json")


def test_hub_ids_plan_each_family(tmp_path, monkeypatch):
    """`--model org/NAME` through the local hub (tests/hub_server.py): config and headers read, no weight bytes."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub

    from tests.hub_server import Hub
    from vramplan.inputs.model_dir import resolve_model

    repos = {}
    for name in ("gemma2", "phi3"):
        torch.manual_seed(0)
        cfg = make_config(name, num_hidden_layers=1)
        getattr(transformers, CASES[name][3])(cfg).save_pretrained(tmp_path / name)
        repos[f"org/tiny-{name}"] = tmp_path / name
    with Hub(repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path / "vp"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        for repo, d in repos.items():
            spec, local = resolve_model(repo), load_model_dir(d)
            assert spec.text == local.text and count_params(spec).total == count_params(local).total
            assert spec.stored_total_bytes == local.stored_total_bytes > 0
        assert hub.weight_bytes == 0
    assert json.loads((tmp_path / "phi3" / "config.json").read_text())["model_type"] == "phi3"
