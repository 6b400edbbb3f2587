"""Truth test for the PaliGemma and Gemma 3 image wrappers (families/paligemma.py, gemma3.py): parameter counts
equal transformers' models built on the meta device (PaliGemma 1 on Gemma, PaliGemma 2 on Gemma 2, Gemma 3), the
image tokens equal the features transformers' model makes per image at three tower sizes, and Gemma 3's projector
bytes equal saved_tensors_hooks (docs/estimate.md#model-families). Needs the SigLIP family and the VLM seam."""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("vramplan.estimate.families.siglip", reason="needs the SigLIP family and the VLM seam")

from tests.test_params import measured_linear_groups  # noqa: E402
from vramplan.estimate.params import count_params, largest_layer_params, linear_groups  # noqa: E402
from vramplan.inputs.model_dir import load_model_dir  # noqa: E402

TEXT = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            head_dim=24, vocab_size=320)
SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=14, vision_use_head=False)


def tiny(text_cls, image_size=28):
    return transformers.PaliGemmaConfig(text_config=text_cls(**TEXT).to_dict(),
                                        vision_config=transformers.SiglipVisionConfig(
                                            **{**SIGLIP, "image_size": image_size}).to_dict(),
                                        projection_dim=TEXT["hidden_size"], image_token_index=300, vocab_size=320)


@pytest.mark.parametrize("image_size", [28, 42, 56])
def test_image_tokens_equal_the_models_features(tmp_path, image_size):
    cfg = tiny(transformers.GemmaConfig, image_size)
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        feats = model.model.get_image_features(torch.randn(1, 3, image_size, image_size)).pooler_output
    assert spec.image_tokens == spec.tower_tokens == feats.shape[1] == cfg.text_config.num_image_tokens


def test_defaults_are_paligemma_3b():
    from vramplan.estimate.families import paligemma

    parts = paligemma.from_hf_config({"model_type": "paligemma"}, "config.json")
    c = transformers.PaliGemmaConfig()
    assert (parts.text.hidden_size, parts.text.num_layers, parts.text.num_key_value_heads, parts.text.vocab_size) == (
        c.text_config.hidden_size, c.text_config.num_hidden_layers, c.text_config.num_key_value_heads,
        c.text_config.vocab_size)
    assert (parts.vision.hidden_size, parts.vision.intermediate_size, parts.vision.image_size) == (
        c.vision_config.hidden_size, c.vision_config.intermediate_size, c.vision_config.image_size)
    assert paligemma.llm_tokens_per_image(parts.projector, parts.vision, None) == 256


# --- Gemma 3 with images (families/gemma3.py) ----------------------------------------------------------------
def tiny_gemma3(image_size=56):
    return transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**TEXT, sliding_window=64).to_dict(),
                                     vision_config=transformers.SiglipVisionConfig(
                                         **{**SIGLIP, "image_size": image_size}).to_dict(),
                                     mm_tokens_per_image=4, image_token_index=300, boi_token_index=301,
                                     eoi_token_index=302)


@pytest.mark.parametrize("name", ["paligemma", "paligemma2", "gemma3"])
def test_params_exact(tmp_path, name):
    cfg = {"paligemma": lambda: tiny(transformers.GemmaConfig), "paligemma2": lambda: tiny(transformers.Gemma2Config),
           "gemma3": tiny_gemma3}[name]()
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    with torch.device("meta"):
        model = (transformers.Gemma3ForConditionalGeneration if name == "gemma3"
                 else transformers.PaliGemmaForConditionalGeneration)(cfg)
    assert spec.projector.family == name.rstrip("2") and spec.text.family == "gemma"
    assert (spec.text.sandwich_norms, spec.text.qk_norm) == (name != "paligemma", name == "gemma3")
    counts = count_params(spec)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.vision_total == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts.projector == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert largest_layer_params(spec) == max(p.numel() for p in model.parameters())
    ours = Counter({(g.component, g.name, g.d_in, g.d_out, g.bias): g.count for g in linear_groups(spec)})
    assert ours == measured_linear_groups(model)


@pytest.mark.parametrize("image_size", [56, 84, 112])
def test_gemma3_image_tokens_and_projector_bytes(tmp_path, image_size):
    """Tokens equal the model's pooled features; a trained projector on a frozen bf16 tower saves
    (4 + 2) x D bytes per image token (saved_tensors_hooks)."""
    from vramplan.estimate.families import gemma3, module_for

    from .act_measure import saved_bytes

    cfg = tiny_gemma3(image_size)
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16).train()
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    px = torch.randn(2, 3, image_size, image_size, dtype=torch.bfloat16)
    got = saved_bytes(lambda: model.model.get_image_features(px).pooler_output, list(model.parameters()))
    feats = model.model.get_image_features(px).pooler_output
    assert spec.image_tokens == feats.shape[1] == 4 and spec.tower_tokens == (image_size // 14) ** 2
    assert got == 2 * 4 * gemma3.saved_bytes_per_image_token(spec.projector, 2)
    assert module_for(spec.projector) is gemma3
