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


def test_a_vlm_without_its_processor_config_is_one_refusal(tmp_path, capsys):
    """The tracer's own entry point in this process (the subprocess `vramplan estimate` runs would add seconds of
    imports): exit 2 with an "unsupported" answer, which vramplan turns into one usage line (exit 2)."""
    from types import SimpleNamespace

    from train.trace_model import main
    from vramplan.errors import UsageError
    from vramplan.plan.traced import _error, parse

    req = {"schema": "vramplan-trace-request/1", "config": AYA, "quant": "nf4", "double_quant": True,
           "llm_lora": None, "seq_len": 128, "micro_batch": 1, "attn": "sdpa", "steps": [], "processor": None}
    (tmp_path / "req.json").write_text(json.dumps(req))
    assert main([str(tmp_path / "req.json"), str(tmp_path / "out.json")]) == 2
    out = parse(json.loads((tmp_path / "out.json").read_text()), "out.json")
    assert out["error"]["kind"] == "unsupported"
    err = _error(out["error"], SimpleNamespace(name="aya"))
    assert isinstance(err, UsageError) and err.exit_code == 2
    assert "'aya_vision'" in err.message and "preprocessor_config.json" in err.message and "\n" not in err.message
    assert capsys.readouterr().err.count("\n") == 1  # the tracer's own stderr: one line


def test_an_image_longer_than_the_sequence_is_refused():
    """The trace side's answer (kind "unsupported": exit 2 in `vramplan estimate`), without the subprocess."""
    from train import trace_vlm
    from train.trace_model import TraceError, hf_config

    with pytest.raises(TraceError) as e:
        trace_vlm.setup(hf_config(AYA), {"processor": PROCESSOR, "seq_len": 16, "steps": [{}]})
    assert e.value.kind == "unsupported" and "16 tokens" in e.value.message and "--seq-len" in e.value.message
