"""Truth test: analytic parameter counts == transformers on the meta device, exactly
(docs/estimate.md#checked-against-reality).

Every shipped model profile (LLaVA, LLM parts, the CLIP part) and a few tiny configs (GQA, tied
embeddings, biases, explicit head_dim) are instantiated with `torch.device("meta")` from a config
built from the profile; totals, per-component splits (named_parameters prefixes), the Linear groups,
the largest tensor and one decoder layer must match. LoRA counts are checked against PEFT's
trainable parameters on a tiny real model on CPU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramplan.estimate.families import clip  # noqa: E402
from vramplan.estimate.params import (  # noqa: E402
    count_params,
    decoder_layer_params,
    largest_layer_params,
    linear_groups,
    lora_modules,
    lora_params,
    vision_params,
)
from vramplan.estimate.specs import LoraSpec, ModelSpec, ProjectorSpec, TextSpec, VisionSpec  # noqa: E402
from vramplan.inputs import profiles as P  # noqa: E402

LINEAR_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2",
                "linear_1", "linear_2"}


def text_config(t: TextSpec):
    return transformers.LlamaConfig(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
        vocab_size=t.vocab_size, head_dim=t.d_head, tie_word_embeddings=t.tie_word_embeddings,
        attention_bias=t.attention_bias, mlp_bias=t.mlp_bias, max_position_embeddings=t.max_position_embeddings)


def vision_config(v: VisionSpec):
    return transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels)


def build(m: ModelSpec, device: str = "meta"):
    with torch.device(device):
        if m.vision is None:
            return transformers.LlamaForCausalLM(text_config(m.text))
        cfg = transformers.LlavaConfig(text_config=text_config(m.text), vision_config=vision_config(m.vision),
                                       vision_feature_layer=m.vision.feature_layer, projector_hidden_act="gelu",
                                       image_token_index=m.text.vocab_size - 1,
                                       tie_word_embeddings=m.text.tie_word_embeddings)
        return transformers.LlavaForConditionalGeneration(cfg)


def component(name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    if name.startswith("lm_head"):
        return "lm_head"
    return "llm"


def measured(model) -> dict[str, int]:
    out: Counter = Counter()
    for name, p in model.named_parameters():  # tied parameters are listed once
        c = component(name)
        leaf = name.split(".")[-2]
        if c == "llm":
            c = "llm_embed" if "embed_tokens" in name else ("llm_linear" if leaf in LINEAR_NAMES else "llm_norms")
        elif c == "vision":
            c = "vision_linear" if leaf in LINEAR_NAMES else "vision_other"
        out[c] += p.numel()
    return dict(out)


def measured_linear_groups(model) -> Counter:
    out: Counter = Counter()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            out[(component(name), name.split(".")[-1], mod.in_features, mod.out_features, mod.bias is not None)] += 1
    return out


TINY = {
    "tiny-gqa": ModelSpec("tiny-gqa", "test", TextSpec(2, 64, 96, 8, 2, 500), VisionSpec(2, 32, 48, 4, 28, 14),
                          ProjectorSpec("mlp2x_gelu", 32, 64)),
    "tiny-tied-bias": ModelSpec("tiny-tied-bias", "test",
                                TextSpec(3, 48, 80, 4, 4, 300, tie_word_embeddings=True, attention_bias=True,
                                         mlp_bias=True),
                                VisionSpec(1, 16, 40, 2, 32, 8, num_channels=3), ProjectorSpec("mlp2x_gelu", 16, 48)),
    "tiny-headdim": ModelSpec("tiny-headdim", "test", TextSpec(2, 64, 128, 4, 2, 256, head_dim=32), None, None),
}
SHIPPED = P.list_profiles("model") + P.list_profiles("llm")


def spec_for(name: str) -> ModelSpec:
    return TINY[name] if name in TINY else P.load_model(name)


@pytest.mark.parametrize("name", SHIPPED + list(TINY))
def test_counts_equal_meta_device_instantiation(name):
    m = spec_for(name)
    model = build(m)
    ours = count_params(m)
    theirs = measured(model)
    assert ours.total == sum(p.numel() for p in model.parameters())
    assert ours.llm_linear == theirs.get("llm_linear", 0)
    assert ours.llm_embed == theirs.get("llm_embed", 0)
    assert ours.llm_norms == theirs.get("llm_norms", 0)
    assert ours.llm_lm_head == theirs.get("lm_head", 0)
    assert ours.vision_linear == theirs.get("vision_linear", 0)
    assert ours.vision_other == theirs.get("vision_other", 0)
    assert ours.projector == theirs.get("projector", 0)
    assert largest_layer_params(m) == max(p.numel() for p in model.parameters())
    layers = model.model.language_model.layers if m.vision else model.model.layers
    assert decoder_layer_params(m) == sum(p.numel() for p in layers[0].parameters())
    ours_groups = Counter({(g.component, g.name, g.d_in, g.d_out, g.bias): g.count for g in linear_groups(m)})
    assert ours_groups == measured_linear_groups(model)


def test_published_counts():
    """Anchors: transformers models built on the meta device (accelerate init_empty_weights) and the
    LLaVA-1.5 release."""
    assert count_params(P.load_model("llama-3-8b-instruct")).total == 8_030_261_248
    assert count_params(P.load_model("vicuna-13b-v1.5")).total == 13_015_864_320
    c13 = count_params(P.load_model("llava-v1.5-13b"))
    assert (c13.vision_total, c13.projector) == (303_507_456, 31_467_520)
    assert count_params(P.load_model("llava-llama3-8b-instruct")).projector == 20_979_712


def test_clip_part_equals_clip_vision_model():
    v = P.load_vision("clip-vit-large-patch14-336")
    with torch.device("meta"):
        model = transformers.CLIPVisionModel(vision_config(v))
    assert vision_params(v) == sum(p.numel() for p in model.parameters()) == 303_507_456
    groups = Counter({(g.name, g.d_in, g.d_out): g.count for g in clip.linear_groups(v)})
    real = Counter((n.split(".")[-1], mod.in_features, mod.out_features) for n, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear))
    assert groups == real


def test_llava_profiles_match_their_parts():
    """A LLaVA profile repeats its parts' numbers (only the vocab grows by the added image/pad tokens)."""
    for llava, llm in (("llava-llama3-8b-instruct", "llama-3-8b-instruct"), ("llava-v1.5-7b", "vicuna-7b-v1.5"),
                       ("llava-v1.5-13b", "vicuna-13b-v1.5")):
        a, b = P.load_model(llava), P.load_model(llm)
        assert replace(a.text, vocab_size=b.text.vocab_size) == b.text
        assert a.text.vocab_size > b.text.vocab_size and a.text.vocab_size % 64 == 0
        assert a.vision == P.load_vision("clip-vit-large-patch14-336")


def _peft_trainable(model, target_modules) -> tuple[int, int]:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules)
    pm = peft.get_peft_model(model, cfg)
    lora = [p for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n]
    return sum(p.numel() for p in lora), len([n for n, _ in pm.named_parameters() if "lora_A" in n])


@pytest.mark.parametrize("comp,targets", [
    ("llm", ("all-linear",)), ("llm", ("q_proj", "v_proj")), ("vision", ("q_proj", "k_proj", "v_proj", "out_proj",
                                                                         "fc1", "fc2")), ("vision", ("fc1",)),
])
def test_lora_params_equal_peft(comp, targets):
    m = TINY["tiny-gqa"]
    torch.manual_seed(0)
    model = build(m, "cpu")
    names = [g.name for g in linear_groups(m) if g.component == comp] if "all-linear" in targets else list(targets)
    tower = "language_model" if comp == "llm" else "vision_tower"
    regex = rf".*{tower}.*\.({'|'.join(sorted(set(names)))})$"
    trainable, modules = _peft_trainable(model, regex)
    spec = LoraSpec(4, 8, 0.0, targets)
    assert lora_params(linear_groups(m), spec, comp) == trainable
    assert lora_modules(linear_groups(m), spec, comp) == modules


def test_lora_all_linear_matches_peft_all_linear_on_llm():
    """PEFT's own "all-linear" (every Linear but the output layer) == ours on an LLM-only model."""
    m = TINY["tiny-headdim"]
    model = build(m, "cpu")
    trainable, _ = _peft_trainable(model, "all-linear")
    assert lora_params(linear_groups(m), LoraSpec(4, 8, 0.0, ("all-linear",)), "llm") == trainable


def test_estimate_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from vramplan.estimate import params; from vramplan.inputs import profiles, gpus, model_dir; "
            "[params.count_params(profiles.load_model(n)) for n in profiles.list_profiles('model')]; "
            "gpus.parse_gpus('2x8xA100-80G'); "
            "bad = {'torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
