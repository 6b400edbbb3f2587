"""Truth tests for the Qwen2-VL / Qwen2.5-VL and Idefics3 / SmolVLM families (families/qwen2_vl.py,
qwen2_vl_vit.py, idefics3.py, idefics3_vit.py): parameter counts per component equal transformers' model built on
the meta device from the same config; image tokens equal the real image processors' output for PIL images at
three sizes; the towers' saved bytes with LoRA equal saved_tensors_hooks (docs/estimate.md#checked-against-reality).
"""

from __future__ import annotations

from collections import Counter

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramplan.estimate.families import module_for, qwen2_vl  # noqa: E402
from vramplan.estimate.params import count_params, largest_layer_params, linear_groups  # noqa: E402
from vramplan.estimate.specs import LoraSpec, ModelSpec  # noqa: E402

TEXT = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=320)
SIZES = [(480, 640), (1000, 300), (64, 90)]  # (height, width): landscape, tall, below min_pixels


def _qwen_config(name):
    if name.startswith("qwen2_vl"):
        vc = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=3)
        return transformers.Qwen2VLConfig(text_config={**TEXT, "tie_word_embeddings": name.endswith("tied")},
                                          vision_config=vc)
    vc = dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=4, out_hidden_size=48,
              fullatt_block_indexes=[1], window_size=56)
    return transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vc)


def _flat(d: dict) -> dict:
    """The released checkpoints' layout: the text keys at the top level, no text_config."""
    d = dict(d)
    return {**d.pop("text_config"), **d, "model_type": d["model_type"]}


def _component(name: str) -> str:
    if ".merger." in name or ".connector." in name:
        return "projector"
    if ".visual." in name or ".vision_model." in name:
        return "vision"
    return "llm"


def _measured(model) -> Counter:
    out = Counter()
    for name, p in model.named_parameters():
        out[_component(name)] += p.numel()
    return out


def _linears(model) -> Counter:
    out = Counter()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            c = _component(name)
            leaf = ".".join(name.split(".")[-2:]) if c == "projector" and ".merger." in name else name.split(".")[-1]
            out[(c, leaf, mod.in_features, mod.out_features, mod.bias is not None)] += 1
    return out


def _check_counts(spec: ModelSpec, model):
    ours, theirs = count_params(spec), _measured(model)
    assert (ours.llm_total, ours.vision_total, ours.projector) == (theirs["llm"], theirs["vision"],
                                                                   theirs["projector"])
    assert ours.total == sum(p.numel() for p in model.parameters())
    assert largest_layer_params(spec) == max(p.numel() for p in model.parameters())
    assert Counter({(g.component, g.name, g.d_in, g.d_out, g.bias): g.count for g in linear_groups(spec)}) \
        == _linears(model)


def _spec(parts) -> ModelSpec:
    return ModelSpec("t", "test", parts.text, parts.vision, parts.projector)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_vl-tied", "qwen2_5_vl"])
@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_qwen_counts_equal_meta_device_instantiation(name, layout):
    cfg = _qwen_config(name)
    d = cfg.to_dict()
    parts = qwen2_vl.from_hf_config(_flat(d) if layout == "flat" else d, "config.json")
    assert parts.text.family == "qwen2" and parts.text.tie_word_embeddings == name.endswith("tied")
    with torch.device("meta"):
        model = getattr(transformers, type(cfg).__name__.replace("Config", "ForConditionalGeneration"))(cfg)
    _check_counts(_spec(parts), model)


def test_qwen_defaults_are_the_config_classes():
    """Keys a config.json omits take Qwen2-VL's config class defaults (text and vision)."""
    for cls in (transformers.Qwen2VLConfig, transformers.Qwen2_5_VLConfig):
        d = {"model_type": cls.model_type}
        parts = qwen2_vl.from_hf_config(d, "config.json")
        with torch.device("meta"):
            c = cls()
        t = c.text_config
        assert (parts.text.hidden_size, parts.text.num_layers, parts.text.num_key_value_heads,
                parts.text.vocab_size) == (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.vocab_size)
        v = c.vision_config
        assert parts.vision.num_layers == v.depth and parts.projector.out_features == getattr(
            v, "out_hidden_size", v.hidden_size)


def _qwen_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kw)


@pytest.mark.parametrize("proc", [{}, {"min_pixels": 128 * 28 * 28, "max_pixels": 256 * 28 * 28},
                                  {"size": {"shortest_edge": 3136, "longest_edge": 64 * 28 * 28}}])
def test_qwen_image_tokens_equal_the_processor(proc):
    from PIL import Image

    parts = qwen2_vl.from_hf_config(_qwen_config("qwen2_vl").to_dict(), "config.json", processor=proc)
    ip = _qwen_processor(**proc)
    for h, w in SIZES:
        out = ip(Image.new("RGB", (w, h)), return_tensors="np")
        t, gh, gw = (int(x) for x in out["image_grid_thw"][0])
        assert qwen2_vl.tower_tokens_per_image(parts.projector, parts.vision, (h, w)) == t * gh * gw \
            == out["pixel_values"].shape[0]
        assert qwen2_vl.llm_tokens_per_image(parts.projector, parts.vision, (h, w)) == t * gh * gw // 4


def test_qwen_processor_config_forms():
    """min/max pixels from preprocessor_config.json keys, a processor_config.json's image_processor table, or
    size; a bad value is one line naming the key."""
    nested = {"image_processor": {"max_pixels": 100 * 28 * 28}}
    assert qwen2_vl.pixel_bounds(nested, "c")["max_pixels"] == 100 * 28 * 28
    assert qwen2_vl.pixel_bounds(None, "c") == {"min_pixels": 3136, "max_pixels": 28 * 28 * 1280}
    with pytest.raises(ValueError, match="max_pixels"):
        qwen2_vl.pixel_bounds({"max_pixels": -1}, "c")


def test_qwen25_window_attention_span():
    """Windowed blocks attend within window_size/(merge*patch) merged units a side (get_vision_window_index)."""
    from transformers.vision_utils import get_vision_window_index

    parts = qwen2_vl.from_hf_config(_qwen_config("qwen2_5_vl").to_dict(), "config.json")
    v = parts.vision
    vit = module_for(v)
    for size in SIZES:
        gh, gw = vit.grid(v, size)
        _, cu = get_vision_window_index(torch.tensor([[1, gh, gw]]), 2, 56, 14)
        lens = (cu[1:] - cu[:-1]).tolist()
        windowed = sum(n * n for n in lens) / (gh * gw)
        expect = (1 * gh * gw + 2 * windowed) / 3  # one full-attention block of three
        assert vit.attention_span(v, size) == pytest.approx(expect)


def _qwen_vit_saved(name, layers, targets, r, dropout, gh=8, gw=12):
    """Saved bytes of a Qwen2(.5)-VL ViT's forward in bf16 with LoRA (SDPA; dropout as the CUDA kernel saves it)."""
    peft = pytest.importorskip("peft")
    from tests.estimate.act_measure import saved_bytes
    from train.trace_fake import cuda_dropout

    torch.manual_seed(0)
    vc = _qwen_config(name).vision_config
    vc.depth = layers
    vc._attn_implementation = "sdpa"
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cls = Qwen2VisionTransformerPretrainedModel if name == "qwen2_vl" else Qwen2_5_VisionTransformerPretrainedModel
    model = cls(vc).to(torch.bfloat16).train()
    model.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout,
                                                       target_modules=list(targets)),
                                autocast_adapter_dtype=False).to(torch.bfloat16)
    px = torch.randn(gh * gw, 3 * 2 * 14 * 14, dtype=torch.bfloat16)
    with cuda_dropout():
        return saved_bytes(lambda: model(px, grid_thw=torch.tensor([[1, gh, gw]])).last_hidden_state,
                           list(model.parameters()))


@pytest.mark.parametrize("name,targets,r,dropout", [
    ("qwen2_vl", ("qkv", "attn.proj", "fc1", "fc2"), 8, 0.0),
    ("qwen2_vl", ("qkv", "fc2"), 4, 0.1),
    ("qwen2_5_vl", ("qkv", "attn.proj", "gate_proj", "up_proj", "down_proj"), 8, 0.0),
    ("qwen2_5_vl", ("gate_proj", "up_proj", "attn.proj"), 4, 0.05)])
def test_qwen_vit_saved_bytes_with_lora(name, targets, r, dropout):
    """One block's saved bytes per patch = the 3-block minus the 2-block tower, measured: exact, the formula counts
    ops. (2 minus 1 block also holds the rotary cos/sin tables, 8*d_head B per patch saved once per tower.)"""
    measured = (_qwen_vit_saved(name, 3, targets, r, dropout) - _qwen_vit_saved(name, 2, targets, r, dropout)) / 96
    v = qwen2_vl.from_hf_config(_qwen_config(name).to_dict(), "config.json").vision
    lora = LoraSpec(r=r, alpha=16, dropout=dropout, targets=tuple(t.split(".")[-1] for t in targets))
    assert module_for(v).saved_bytes_per_token(v, lora) == measured
    assert module_for(v).saved_bytes_per_token(v, None) == 0


def test_projector_saved_bytes():
    """A trained PatchMerger / Idefics3 connector over a frozen tower's output, per LLM image token."""
    from tests.estimate.act_measure import saved_bytes

    for name in ("qwen2_vl", "qwen2_5_vl"):
        cfg = _qwen_config(name)
        p = qwen2_vl.from_hf_config(cfg.to_dict(), "config.json").projector
        with torch.device("cpu"):
            model = getattr(transformers, type(cfg).__name__.replace("Config", "ForConditionalGeneration"))(cfg)
        merger = model.model.visual.merger.to(torch.bfloat16).train()
        x = torch.randn(4 * 24, p.in_features, dtype=torch.bfloat16)
        assert qwen2_vl.saved_bytes_per_image_token(p, 2) * 24 == saved_bytes(lambda: merger(x),
                                                                               list(merger.parameters()))
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    from vramplan.estimate.families import idefics3

    cfg = _idefics_config("idefics3")
    connector = Idefics3Connector(cfg).to(torch.bfloat16).train()
    p = idefics3.from_hf_config(cfg.to_dict(), "config.json").projector
    x = torch.randn(3, 16, 32, dtype=torch.bfloat16)  # 3 frames of 4x4 patches -> 3 x 4 image tokens
    assert idefics3.saved_bytes_per_image_token(p, 2) * 12 == saved_bytes(lambda: connector(x),
                                                                          list(connector.parameters()))


# --- Idefics3 / SmolVLM ------------------------------------------------------------------------------------------
IDEFICS_VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      image_size=56, patch_size=14)
TILE_PROC = {"size": {"longest_edge": 168}, "max_image_size": {"longest_edge": 56}}


def _idefics_config(name, tie=False):
    cls = transformers.SmolVLMConfig if name == "smolvlm" else transformers.Idefics3Config
    return cls(vision_config=IDEFICS_VISION, text_config={**TEXT, "model_type": "llama", "tie_word_embeddings": True},
               tie_word_embeddings=tie)


@pytest.mark.parametrize("name,tie", [("idefics3", False), ("idefics3", True), ("smolvlm", False)])
def test_idefics_counts_equal_meta_device_instantiation(name, tie):
    from vramplan.estimate.families import idefics3

    cfg = _idefics_config(name, tie)
    parts = idefics3.from_hf_config(cfg.to_dict(), "config.json")
    assert parts.text.family == "llama" and parts.text.tie_word_embeddings == tie
    with torch.device("meta"):
        model = getattr(transformers, type(cfg).__name__.replace("Config", "ForConditionalGeneration"))(cfg)
    _check_counts(_spec(parts), model)


def _tiny_tokenizer():
    """A word-level tokenizer that knows the processors' special tokens and merges "\\n\\n" (as Llama-3's does)."""
    from tokenizers import Tokenizer, models

    specials = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + \
        [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "\n": 1, "\n\n": 2}, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]",
                                                additional_special_tokens=specials)


@pytest.mark.parametrize("proc", [TILE_PROC, {**TILE_PROC, "do_image_splitting": False},
                                  {"image_processor": {"size": {"longest_edge": 300},
                                                       "max_image_size": {"longest_edge": 56}}}])
def test_idefics_image_tokens_equal_the_processor(proc):
    """Tower patches from the processor's frames; LLM tokens = the processor's input_ids for a prompt "<image>"."""
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from vramplan.estimate.families import idefics3

    parts = idefics3.from_hf_config(_idefics_config("idefics3").to_dict(), "config.json", processor=proc)
    p, v = parts.projector, parts.vision
    ip = Idefics3ImageProcessorPil(**proc.get("image_processor", proc))
    tokenizer = _tiny_tokenizer()
    processor = transformers.Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=4)
    for h, w in SIZES:
        out = processor(text="<image>", images=[Image.new("RGB", (w, h))])
        assert idefics3.tower_tokens_per_image(p, v, (h, w)) == out["pixel_values"].shape[1] * 16
        assert idefics3.llm_tokens_per_image(p, v, (h, w)) == len(out["input_ids"][0])
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        assert idefics3.projector_tokens_per_image(p, v, (h, w)) == out["input_ids"][0].count(image_id)


def test_smolvlm_frames_equal_its_image_processor():
    from PIL import Image
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from vramplan.estimate.families import idefics3

    parts = idefics3.from_hf_config(_idefics_config("smolvlm").to_dict(), "config.json", processor=TILE_PROC)
    ip = SmolVLMImageProcessorPil(**TILE_PROC)
    for h, w in SIZES:
        out = ip(Image.new("RGB", (w, h)), return_row_col_info=True)
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        assert module_for(parts.vision).tiles(parts.vision, (h, w)) == (rows, cols)
        frames = len(out["pixel_values"][0])
        assert idefics3.tower_tokens_per_image(parts.projector, parts.vision, (h, w)) == frames * 16


def _idefics_vit_saved(layers, targets, r, dropout):
    peft = pytest.importorskip("peft")
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    from tests.estimate.act_measure import saved_bytes
    from train.trace_fake import cuda_dropout

    torch.manual_seed(0)
    vc = transformers.Idefics3VisionConfig(**{**IDEFICS_VISION, "num_hidden_layers": layers})
    vc._attn_implementation = "sdpa"
    model = Idefics3VisionTransformer(vc).to(torch.bfloat16).train()
    model.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout,
                                                       target_modules=list(targets)),
                                autocast_adapter_dtype=False).to(torch.bfloat16)
    px = torch.randn(2, 3, 56, 56, dtype=torch.bfloat16)
    with cuda_dropout():
        return saved_bytes(lambda: model(pixel_values=px).last_hidden_state, list(model.parameters()))


@pytest.mark.parametrize("targets,r,dropout", [(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), 8, 0.0),
                                               (("v_proj", "out_proj", "fc1"), 4, 0.05)])
def test_idefics_vit_saved_bytes_with_lora(targets, r, dropout):
    from vramplan.estimate.families import idefics3

    measured = (_idefics_vit_saved(2, targets, r, dropout) - _idefics_vit_saved(1, targets, r, dropout)) / 32
    v = idefics3.from_hf_config(_idefics_config("idefics3").to_dict(), "config.json").vision
    lora = LoraSpec(r=r, alpha=16, dropout=dropout, targets=targets)
    assert module_for(v).saved_bytes_per_token(v, lora) == measured


def test_towers_are_read_only_with_their_wrapper():
    """A LLaVA config naming one of these towers is one clear line, not a crash."""
    from vramplan.estimate.families import llava

    for vt in ("qwen2_vl_vision", "idefics3_vision"):
        with pytest.raises(ValueError, match="read only from its own model's config.json"):
            llava.from_hf_config({"model_type": "llava", "vision_config": {"model_type": vt}}, "config.json")
