"""Local HF model dirs: architecture from config.json, exact stored bytes from safetensors headers."""

from __future__ import annotations

import json
import struct

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vramplan.errors import UsageError  # noqa: E402
from vramplan.estimate.params import count_params  # noqa: E402
from vramplan.inputs.model_dir import load_model_dir, read_safetensors_header, resolve_model, safetensors_files  # noqa: E402

DT = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


def tiny_llava(dtype):
    torch.manual_seed(0)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    cfg = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=319)
    return transformers.LlavaForConditionalGeneration(cfg).to(dtype)


def header_bytes(files) -> int:
    total = 0
    for f in files:
        h = read_safetensors_header(f)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__")
    return total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiny_llava_dir_exact_bytes(tmp_path, dtype):
    model = tiny_llava(dtype)
    model.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    params = sum(p.numel() for p in model.parameters())
    tensor_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert count_params(spec).total == params
    assert spec.stored_total_bytes == header_bytes(safetensors_files(tmp_path)) == tensor_bytes
    assert spec.stored_bytes_by_dtype == {DT[dtype]: tensor_bytes}
    assert spec.stored_dtype == DT[dtype]
    assert spec.vision is not None and spec.image_tokens == 4 and spec.image_token_added
    assert (spec.projector.in_features, spec.projector.out_features) == (32, 64)
    assert spec.path == str(tmp_path.resolve())
    assert resolve_model(str(tmp_path)).stored_total_bytes == tensor_bytes


def test_sharded_index_and_mixed_dtypes(tmp_path):
    model = tiny_llava(torch.bfloat16)
    model.model.vision_tower.to(torch.float32)  # like XTuner's fp32 ViT next to a 16-bit LLM
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    files = safetensors_files(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(files) > 1
    spec = load_model_dir(tmp_path)
    want: dict[str, int] = {}
    for p in model.parameters():
        want[DT[p.dtype]] = want.get(DT[p.dtype], 0) + p.numel() * p.element_size()
    assert spec.stored_bytes_by_dtype == want
    assert spec.stored_total_bytes == sum(want.values()) == header_bytes(files)
    # a shard named in the index but missing: an incomplete download, said as such
    files[0].unlink()
    with pytest.raises(UsageError, match="missing"):
        load_model_dir(tmp_path)


def test_llama_dir_is_llm_only(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=128, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    spec = load_model_dir(tmp_path)
    assert spec.vision is None and spec.projector is None and not spec.image_token_added
    assert count_params(spec).total == sum(p.numel() for p in model.parameters())
    assert spec.stored_total_bytes == sum(p.numel() * p.element_size() for p in model.parameters())


def test_errors_name_the_path_and_fix(tmp_path):
    with pytest.raises(UsageError, match="no such directory") as e:
        resolve_model(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in e.value.message and e.value.hint
    with pytest.raises(UsageError, match=r"no config\.json"):
        load_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    # no family module reads it: planned through the traced path (tests/trace/test_traced_path.py)
    assert load_model_dir(tmp_path).text.family == "traced"
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="unreadable"):
        load_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(UsageError, match="not a valid safetensors"):
        load_model_dir(tmp_path)
    with pytest.raises(UsageError, match="unknown model profile 'llava-nope'"):
        resolve_model("llava-nope")


def test_corrupt_offsets_detected(tmp_path):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 30]}}).encode()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4, "num_attention_heads": 1,
                                                     "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 4}))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(30))
    with pytest.raises(UsageError, match="corrupt"):
        load_model_dir(tmp_path)


def test_hub_id_resolves_from_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UsageError) as e:
        resolve_model("someorg/tiny-llava")
    assert "Hugging Face cache" in e.value.message and e.value.exit_code == 2
    assert "HF_HUB_OFFLINE=0 vramplan estimate --model someorg/tiny-llava" in e.value.hint
    repo = tmp_path / "hub" / "models--someorg--tiny-llava"
    snap = repo / "snapshots" / "abc123"
    tiny_llava(torch.bfloat16).save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    spec = resolve_model("someorg/tiny-llava")
    assert spec.path == str(snap.resolve()) and spec.vision is not None and spec.stored_total_bytes > 0
    # the legacy variable huggingface_hub still honours (after HF_HUB_CACHE, before HF_HOME)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert resolve_model("someorg/tiny-llava").path == str(snap.resolve())
    # refs/main names a snapshot without config.json (an interrupted download): the one that has it is used
    (repo / "snapshots" / "partial").mkdir()
    (repo / "refs" / "main").write_text("partial")
    assert resolve_model("someorg/tiny-llava").path == str(snap.resolve())


# config.json of xtuner/llava-llama-3-8b-v1_1-transformers, verbatim
# (https://huggingface.co/xtuner/llava-llama-3-8b-v1_1-transformers/blob/main/config.json): it omits keys
# that take transformers' defaults (hidden_size 4096, 32 layers, 32 heads), which the loader must fill the same way.
XTUNER_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 128257,
    "model_type": "llava", "pad_token_id": 128258, "projector_hidden_act": "gelu",
    "text_config": {"architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": 128001,
                    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                    "torch_dtype": "float16", "vocab_size": 128320},
    "torch_dtype": "float16", "transformers_version": "4.40.1",
    "vision_config": {"architectures": ["CLIPVisionModel"], "dropout": 0.0, "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768, "torch_dtype": "float32"},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}


def test_real_xtuner_config_equals_profile_and_transformers(tmp_path):
    from vramplan.inputs.profiles import load_model

    (tmp_path / "config.json").write_text(json.dumps(XTUNER_CONFIG))
    spec = load_model_dir(tmp_path)
    prof = load_model("llava-llama3-8b-instruct")
    assert (spec.text, spec.vision, spec.projector) == (prof.text, prof.vision, prof.projector)
    assert spec.stored_dtype == "fp16" and spec.stored_total_bytes is None and spec.image_token_added
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**XTUNER_CONFIG))
    assert count_params(spec).total == sum(p.numel() for p in model.parameters()) == 8_355_272_704
