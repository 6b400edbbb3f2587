"""Truth tests for the SigLIP tower and the LLaVA-NeXT / LLaVA-OneVision wrappers (families/siglip.py,
llava_next.py, llava_onevision.py): parameter counts equal transformers' models built on the meta device,
and the image tokens equal what transformers' own processor and model code produce
(docs/estimate.md#model-families)."""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_params import measured_linear_groups  # noqa: E402
from vramplan.estimate.families import siglip  # noqa: E402
from vramplan.estimate.params import count_params, largest_layer_params, linear_groups  # noqa: E402
from vramplan.inputs.model_dir import load_model_dir  # noqa: E402

TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320, max_position_embeddings=256)
SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14)


def _siglip_counts(v) -> tuple[int, Counter]:
    groups = Counter()
    for g in siglip.linear_groups(v):
        groups[(g.name, g.d_in, g.d_out)] += g.count
    return sum(g.params for g in siglip.linear_groups(v)) + sum(siglip.other_params(v).values()), groups


@pytest.mark.parametrize("head", [True, False])
def test_siglip_tower_params_exact(head):
    cfg = transformers.SiglipVisionConfig(**SIGLIP, vision_use_head=head)
    with torch.device("meta"):
        model = transformers.SiglipVisionModel(cfg)
    v = siglip.from_hf_config(cfg.to_dict(), "config.json")
    total, groups = _siglip_counts(v)
    theirs = Counter()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            theirs[(name.split(".")[-1], mod.in_features, mod.out_features)] += 1
    assert total == sum(p.numel() for p in model.parameters())
    assert groups == theirs
    assert siglip.largest_tensor_params(v) == max(p.numel() for p in model.parameters())
    assert v.num_positions == siglip.tokens_per_image(v) == 4  # 2x2 patches, no CLS


def test_siglip_config_defaults_are_the_config_class():
    v = siglip.from_hf_config({"model_type": "siglip_vision_model"}, "config.json")
    c = transformers.SiglipVisionConfig()
    assert (v.hidden_size, v.intermediate_size, v.num_layers, v.num_attention_heads, v.image_size, v.patch_size,
            v.use_head) == (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                            c.image_size, c.patch_size, c.vision_use_head)


def test_siglip_layer_activation_bytes():
    """saved(3 layers) - saved(2 layers) of a real bf16 SigLIP tower with LoRA, as test_activation_truth.py
    measures CLIP: 16h + 4i + 4a + 8 + 2r per adapted Linear (+ the dropout terms)."""
    peft = pytest.importorskip("peft")
    from vramplan.estimate.specs import LoraSpec

    from .act_measure import saved_bytes

    lora = LoraSpec(r=8, alpha=16, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))

    def measure(layers):
        torch.manual_seed(0)
        cfg = transformers.SiglipVisionConfig(**{**SIGLIP, "hidden_size": 64, "intermediate_size": 128,
                                                 "num_hidden_layers": layers, "image_size": 56},
                                              vision_use_head=False, attn_implementation="sdpa")
        m = transformers.SiglipVisionModel(cfg).to(torch.bfloat16).train()
        m.requires_grad_(False)
        m = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                   target_modules=list(lora.targets)),
                                autocast_adapter_dtype=False).to(torch.bfloat16)
        px = torch.randn(1, 3, 56, 56, dtype=torch.bfloat16)
        return saved_bytes(lambda: m(pixel_values=px, output_hidden_states=True).hidden_states[-1],
                           list(m.parameters()))

    v = siglip.VisionSpec(1, 64, 128, 4, 56, 14, use_head=False)
    assert siglip.saved_bytes_per_token(v, lora) * v.num_positions == pytest.approx(measure(3) - measure(2), rel=0.02)
    assert siglip.saved_bytes_per_token(v, None) == 0


def test_llava_with_a_siglip_tower_plans_exact(tmp_path):
    """A LLaVA-1.5-style config.json with a SigLIP tower: exact params, and "full" keeps every patch."""
    cfg = transformers.LlavaConfig(text_config=transformers.LlamaConfig(**TEXT),
                                   vision_config=transformers.SiglipVisionConfig(**SIGLIP, vision_use_head=False),
                                   vision_feature_select_strategy="full", vision_feature_layer=-1,
                                   image_token_index=319)
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(cfg)
    assert spec.family == "llava: llama + siglip"
    assert count_params(spec).total == sum(p.numel() for p in model.parameters())
    assert largest_layer_params(spec) == max(p.numel() for p in model.parameters())
    ours = Counter({(g.component, g.name, g.d_in, g.d_out, g.bias): g.count for g in linear_groups(spec)})
    assert ours == measured_linear_groups(model)
    assert (spec.image_tokens, spec.tower_tokens) == (4, 4)
