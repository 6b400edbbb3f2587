"""Truth tests for the SigLIP tower and the LLaVA-NeXT / LLaVA-OneVision wrappers (families/siglip.py,
llava_next.py, llava_onevision.py): parameter counts equal transformers' models built on the meta device,
and the image tokens equal what transformers' own processor and model code produce
(docs/estimate.md#model-families)."""

from __future__ import annotations

import json
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


# --- LLaVA-NeXT and LLaVA-OneVision ------------------------------------------------------------------------
CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=14)
PINS = [[28, 56], [56, 28], [56, 56]]


def tiny_config(family):
    if family == "llava_next":
        return transformers.LlavaNextConfig(text_config=transformers.LlamaConfig(**TEXT),
                                            vision_config=transformers.CLIPVisionConfig(**CLIP),
                                            image_grid_pinpoints=PINS, image_token_index=319)
    return transformers.LlavaOnevisionConfig(text_config=transformers.Qwen2Config(**TEXT),
                                             vision_config=transformers.SiglipVisionConfig(**SIGLIP,
                                                                                           vision_use_head=False),
                                             image_grid_pinpoints=[[28, 28], *PINS], image_token_index=319,
                                             video_token_index=318)


def model_class(family):
    return {"llava_next": transformers.LlavaNextForConditionalGeneration,
            "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration}[family]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_params_exact(tmp_path, family):
    cfg = tiny_config(family)
    cfg.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    with torch.device("meta"):
        model = model_class(family)(cfg)
    counts = count_params(spec)
    assert spec.projector.family == family
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.vision_total == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts.projector == sum(p.numel() for p in model.model.multi_modal_projector.parameters()) + \
        model.model.image_newline.numel()
    assert largest_layer_params(spec) == max(p.numel() for p in model.parameters())
    ours = Counter({(g.component, g.name, g.d_in, g.d_out, g.bias): g.count for g in linear_groups(spec)})
    assert ours == measured_linear_groups(model)


SIZES = [(336, 336), (672, 336), (1000, 700)]


def _transformers_counts(family, size):
    """(crops from the image processor, LLM tokens from the processor's count, LLM tokens from the model's
    pack_image_features on zero features) for one image of `size` (height, width) at the released configs."""
    from functools import partial
    from types import SimpleNamespace

    from PIL import Image

    if family == "llava_next":
        from transformers.models.llava_next import modeling_llava_next as M
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor as Proc

        cfg, crop, feats = transformers.LlavaNextConfig(), 336, 576
        ip = transformers.LlavaNextImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop,
                                                                                           "width": crop})
        proc = SimpleNamespace(patch_size=14, num_additional_image_tokens=1)
        pack = partial(M.LlavaNextModel.pack_image_features, vision_feature_select_strategy="default")
        drop = 1  # the processor counts CLS, "default" drops it
    else:
        from transformers.models.llava_onevision import modeling_llava_onevision as M
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor as Proc

        cfg, crop, feats = transformers.LlavaOnevisionConfig(), 384, 729
        ip = transformers.LlavaOnevisionImageProcessor()
        proc = SimpleNamespace(num_image_tokens=feats, vision_aspect_ratio="anyres_max_9")
        pack, drop = partial(M.LlavaOnevisionModel.pack_image_features, vision_aspect_ratio="anyres_max_9"), 0
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=cfg.image_grid_pinpoints)
    proc._get_unpadded_features = partial(Proc._get_unpadded_features, proc)
    crops = ip(Image.new("RGB", (size[1], size[0])), return_tensors="pt")["pixel_values"].shape[1]
    assert crops == M.image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, crop)
    by_processor = Proc._get_number_of_features(proc, *size, crop, crop) - drop
    _, lens = pack(SimpleNamespace(config=cfg), [torch.zeros(crops, feats, 1)], torch.tensor([size]),
                   image_newline=torch.zeros(1))
    return crops, by_processor, int(lens[0]), cfg


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_image_tokens_equal_the_processor_and_the_model(family):
    from vramplan.estimate.families import for_model_type
    from vramplan.estimate.families import llava_next as N

    for size in SIZES:
        crops, by_processor, by_model, cfg = _transformers_counts(family, size)
        parts = for_model_type("projector", family).from_hf_config(cfg.to_dict(), "config.json")
        p, v = parts.projector, parts.vision
        per_crop = (v.image_size // v.patch_size) ** 2 + (1 if family == "llava_next" else 0)  # CLIP's CLS
        assert N.tower_tokens_per_image(p, v, size) == crops * per_crop
        assert N.llm_tokens_per_image(p, v, size) == by_processor == by_model, size


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-repos")
    out = {}
    for family in ("llava_next", "llava_onevision"):
        torch.manual_seed(0)
        model_class(family)(tiny_config(family)).to(torch.bfloat16).save_pretrained(root / family)
        (root / family / "preprocessor_config.json").write_text(json.dumps({"image_grid_pinpoints": PINS}))
        out[f"org/tiny-{family.replace('_', '-')}"] = root / family
    return out


def _plan(model: str, **flags) -> tuple[dict, dict]:
    from vramplan.plan.plan_json import plan_dict
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.service import run_estimate

    res = run_estimate(EstimateOptions(model=model, gpus="1x24G", **flags))
    assert res.pick is not None
    return res.data(), plan_dict(res)


# tokens of the tiny models (28-pixel crops of 2x2 patches) at 56x28 (height x width): 3 crops; the grid is
# 2 crops high (4 x 2 features, no padding to cut), + 4 newlines, + the base crop's 4 features
WANT = {"llava_next": (3 * 5, 4 + 4 * 3), "llava_onevision": (3 * 4, 4 + 4 * 3)}


def test_anyres_plans_from_a_local_dir_and_the_hub(tiny_repos, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from tests.hub_server import Hub
    from tests.test_hub import online

    for d in tiny_repos.values():
        family = d.name
        data, plan = _plan(str(d), image_size="56x28")
        m = data["model"]
        assert (m["tower_tokens_per_image"], m["image_tokens"], m["image_size"]) == (*WANT[family], [56, 28])
        assert m["family"].startswith(family) and plan["recipe"]["image_tokens"] == WANT[family][1]
        assert plan["options"]["image_size"] == "56x28"
        assert any("56x28" in a and f"{WANT[family][1]} image tokens" in a for a in data["assumptions"])
    with Hub(tiny_repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path / "vp"))
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        online(monkeypatch, True)
        for repo, d in tiny_repos.items():
            data, _ = _plan(repo, image_size="56x28")
            assert (data["model"]["tower_tokens_per_image"], data["model"]["image_tokens"]) == WANT[d.name]
            assert data["model"]["params"] == _plan(str(d))[0]["model"]["params"]
        assert hub.weight_bytes == 0
        assert any(r.endswith("preprocessor_config.json ") for r in hub.requests if r.startswith("GET"))


def test_dataset_largest_image_sets_the_tokens(tiny_repos, tmp_path):
    from PIL import Image

    for name, (w, h) in (("a.png", (20, 30)), ("b.png", (28, 56)), ("c.png", (50, 10))):
        Image.new("RGB", (w, h)).save(tmp_path / name)
    records = [{"id": str(i), "image": n, "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                            {"from": "gpt", "value": "hello"}]}
               for i, n in enumerate(("a.png", "b.png", "c.png"))]
    (tmp_path / "data.json").write_text(json.dumps(records))
    d = tiny_repos["org/tiny-llava-next"]
    data, _ = _plan(str(d), dataset=str(tmp_path / "data.json"))
    assert data["model"]["image_size"] == [56, 28]  # b.png: 28 wide, 56 high, the largest area
    assert data["model"]["image_tokens"] == WANT["llava_next"][1]
    assert any("largest image of --dataset" in a for a in data["assumptions"])
    default, _ = _plan(str(d))  # no size, no dataset: the pinpoint with the most tokens (56x56: 4 + 4 x 5)
    assert default["model"]["image_size"] == [56, 56] and default["model"]["image_tokens"] == 24


def test_anyres_default_keeps_room_for_text(tmp_path):
    """LLaVA-NeXT's released layout at its default (672x672: 2,928 image tokens) outgrows the recipe's 2048:
    the sequence grows to hold the recipe's text, and says so; an explicit --seq-len below it is refused."""
    from vramplan.errors import UsageError

    transformers.LlavaNextConfig(text_config=transformers.MistralConfig()).save_pretrained(tmp_path)
    data, _ = _plan(str(tmp_path))
    assert data["model"]["image_tokens"] == 2928 and data["model"]["tower_tokens_per_image"] == 5 * 577
    assert data["seq_len"] > 2928 and any("leaves no room for text" in a for a in data["assumptions"])
    with pytest.raises(UsageError, match="--seq-len: 2000 leaves no room"):
        _plan(str(tmp_path), seq_len=2000)
