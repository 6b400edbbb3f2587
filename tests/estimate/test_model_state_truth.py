"""Truth test: per-group model-state bytes equal the tensors of the model the trainer builds
(docs/estimate.md#checked-against-reality).

1. The bundled trainer builds a tiny LLaVA on CPU with a 4-bit NF4 (double quant) LLM + LoRA on the
   LLM and the vision tower + a trained projector; vramplan estimates the same dir from its
   config.json/safetensors headers. Every group must match to the byte.
2. The real architectures (every shipped LLaVA profile) are built on the meta device with peft
   LoRA at the recipes' ranks; trainable and quantizable parameter counts must match exactly.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")


def _trainer_model(model_dir, tmp_path, **kw):
    from train.config import TrainConfig
    from train.model import load_base, prepare

    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(model_dir.parent / "data.json"),
                      model_path=str(model_dir), compute_dtype="fp32", device="cpu", **kw)
    model, _, _ = load_base(str(model_dir), cfg, "cpu")
    return prepare(model, cfg), cfg


def _measured_groups(model) -> dict:
    import bitsandbytes as bnb

    quant, quant_ids = 0, set()
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = mod.weight
            quant_ids.add(id(w))
            quant += w.untyped_storage().nbytes()
            qs = w.quant_state
            tensors = [qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
            quant += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    frozen = trainable = 0
    for p in model.parameters():
        if id(p) in quant_ids:
            continue
        b = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += b
        else:
            frozen += b
    return {"quantized": quant, "frozen": frozen, "trainable": trainable}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from train.tiny import build

    return build(tmp_path_factory.mktemp("tiny"), samples=2) / "model"


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_tiny_llava_groups_match_trainer_tensors(tiny_dir, tmp_path, double_quant):
    from train.config import LoraSpec as TL
    from vramplan.estimate.param_groups import param_groups
    from vramplan.estimate.specs import LoraSpec
    from vramplan.inputs.model_dir import load_model_dir
    from vramplan.inputs.profiles import load_recipe

    model, _ = _trainer_model(tiny_dir, tmp_path, recipe="qlora", quant="nf4", double_quant=double_quant,
                              llm_lora=TL(8, 16, 0.05, "all-linear"),
                              vision_lora=TL(4, 8, 0.05, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")))
    measured = _measured_groups(model)

    spec = load_model_dir(tiny_dir)
    recipe = replace(load_recipe("qlora"), double_quant=double_quant,
                     llm_lora=LoraSpec(8, 16, 0.05, ("all-linear",)),
                     vision_lora=LoraSpec(4, 8, 0.05, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")))
    g = param_groups(spec, recipe)
    # prepare_model_for_kbit_training upcasts every non-quantized weight to fp32; trainable weights are fp32
    assert g.quantized_bytes == measured["quantized"]
    assert g.frozen_params * 4 == measured["frozen"]
    assert g.trainable * 4 == measured["trainable"]


def test_lora_tiny_llava_groups_match_trainer_tensors(tiny_dir, tmp_path):
    from train.config import LoraSpec as TL
    from vramplan.estimate.param_groups import param_groups
    from vramplan.estimate.specs import LoraSpec
    from vramplan.inputs.model_dir import load_model_dir
    from vramplan.inputs.profiles import load_recipe

    model, _ = _trainer_model(tiny_dir, tmp_path, recipe="lora", quant="none", llm_lora=TL(16, 32, 0.05, "all-linear"))
    measured = _measured_groups(model)
    g = param_groups(
        load_model_dir(tiny_dir), replace(load_recipe("lora"), llm_lora=LoraSpec(16, 32, 0.05, ("all-linear",)))
    )
    assert measured["quantized"] == 0 and g.quantized_bytes == 0
    assert g.frozen_params * 4 == measured["frozen"]
    assert g.trainable * 4 == measured["trainable"]


LLAVA_PROFILES = ["llava-llama3-8b-instruct", "llava-v1.5-7b", "llava-v1.5-13b"]


@pytest.mark.parametrize("name", LLAVA_PROFILES)
@pytest.mark.parametrize("recipe_name", ["qlora", "lora"])
def test_real_architectures_on_meta_device(name, recipe_name):
    import peft
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vramplan.estimate.param_groups import param_groups
    from vramplan.inputs.profiles import load_model, load_recipe

    m, r = load_model(name), load_recipe(recipe_name)
    t, v = m.text, m.vision
    cfg = LlavaConfig(
        text_config=LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_layers, num_attention_heads=t.num_attention_heads,
                                num_key_value_heads=t.num_key_value_heads, vocab_size=t.vocab_size,
                                tie_word_embeddings=t.tie_word_embeddings),
        vision_config=CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                       num_hidden_layers=v.num_layers, num_attention_heads=v.num_attention_heads,
                                       image_size=v.image_size, patch_size=v.patch_size),
        vision_feature_layer=v.feature_layer)
    with init_empty_weights():
        model = LlavaForConditionalGeneration(cfg)
        quantizable = sum(mod.weight.numel() for n, mod in model.named_modules()
                          if n.startswith("model.language_model.") and isinstance(mod, torch.nn.Linear))
        targets = [r"model\.language_model\..*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"]
        rank_pattern, alpha_pattern = {}, {}
        if r.vision_lora:
            targets.append(r"model\.vision_tower\..*\.(?:%s)" % "|".join(r.vision_lora.targets))
            rank_pattern = {r"model\.vision_tower\..*": r.vision_lora.r}
            alpha_pattern = {r"model\.vision_tower\..*": r.vision_lora.alpha}
        lc = peft.LoraConfig(r=r.llm_lora.r, lora_alpha=r.llm_lora.alpha, target_modules="|".join(
            f"(?:{x})" for x in targets), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            modules_to_save=["multi_modal_projector"])
        pm = peft.get_peft_model(model, lc)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in pm.parameters())
    g = param_groups(m, r)
    assert g.trainable == trainable
    assert g.frozen_params + g.trainable + (quantizable if r.quant != "none" else 0) == total
    if r.quant != "none":
        assert g.quantized_params == quantizable
