"""The traced path for a vision-language model no family module knows (docs/estimate.md#the-traced-path):
a tiny Aya Vision (SigLIP tower, pixel-shuffle projector, Cohere2 decoder) through `vramplan estimate --model DIR`,
and the one-line refusals of what the trace cannot do."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vramplan.cli import cli

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

TEXT = {"model_type": "cohere2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}
AYA = {"model_type": "aya_vision", "architectures": ["AyaVisionForConditionalGeneration"], "text_config": TEXT,
       "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 64, "patch_size": 8},
       "image_token_index": 10, "downsample_factor": 2}
PROCESSOR = {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 64, "width": 64},
             "crop_to_patches": False}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path / "cache"))


def test_unknown_vlm_plans_through_the_trace(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = tmp_path / "aya"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(AYA))
    (d / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    r = CliRunner().invoke(cli, ["estimate", "--model", str(d), "--seq-len", "128", "--gpus", "1x80G",
                                 "--micro-batch", "1", "--grad-ckpt", "--offload", "none", "--zero", "2",
                                 "--lora-r", "8", "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    data = json.loads(r.stdout)["data"]
    m = data["model"]
    with torch.device("meta"):
        ref = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**AYA))
    assert m["params"] == sum(p.numel() for p in ref.parameters())
    t = m["traced"]
    assert t["architecture"] == "AyaVisionForConditionalGeneration"
    # 64x64 / patch 8 = 64 patches, pixel shuffle 2x2 -> 16 (AyaVisionProcessor's image tokens per tile)
    assert t["image_tokens_per_image"] == 16 and t["image_size"] == [64, 64]
    assert any("traced, not derived" in a and "16 image tokens per image" in a for a in data["assumptions"])
    pick = data["candidates"][data["pick"]]
    assert pick["vram_breakdown"]["activations_saved"] > 0
    g = data["param_groups"]
    lm = ref.model.language_model
    lin = [mod for mod in lm.modules() if isinstance(mod, torch.nn.Linear)]  # LoRA on the language model only
    assert g["trainable_llm_lora"] == sum(8 * (x.in_features + x.out_features) for x in lin)
    assert g["trainable_projector"] == sum(p.numel() for p in ref.model.multi_modal_projector.parameters())
    assert g["trainable_vision_lora"] == 0


def test_what_the_trace_cannot_do_is_one_refusal():
    """No processor config: no image inputs. The trace side's answer (kind "unsupported" = exit 2 in
    `vramplan estimate`, tests/trace/test_traced_path.py), without the subprocess."""
    from train import trace_vlm
    from train.trace_model import TraceError, hf_config

    with pytest.raises(TraceError) as e:
        trace_vlm.setup(hf_config(AYA), {"processor": None, "seq_len": 128, "steps": [{}]})
    assert e.value.kind == "unsupported" and "'aya_vision'" in e.value.message
    assert "preprocessor_config.json" in e.value.message
    with pytest.raises(TraceError) as e:  # an image longer than the sequence
        trace_vlm.setup(hf_config(AYA), {"processor": PROCESSOR, "seq_len": 16, "steps": [{}]})
    assert "16 tokens" in e.value.message and "--seq-len" in e.value.message
