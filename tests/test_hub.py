"""`--model ORG/NAME[@REV]` against a local hub (tests/hub_server.py under HF_ENDPOINT): config and safetensors
headers are read, no weight byte is transferred, offline answers from the cache or says how to fetch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from tests.hub_server import COMMIT, Hub  # noqa: E402
from vramplan.errors import UsageError  # noqa: E402
from vramplan.estimate.params import count_params  # noqa: E402
from vramplan.inputs.model_dir import load_model_dir, resolve_model  # noqa: E402


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-repos")
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    torch.manual_seed(0)
    llava = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=319)).to(torch.bfloat16)
    llava.save_pretrained(root / "llava", max_shard_size="40KB")  # sharded: an index + several headers
    (root / "llava" / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 28, "width": 28}}))
    transformers.LlamaForCausalLM(text).save_pretrained(root / "llama")  # one model.safetensors
    return {"org/tiny-llava": root / "llava", "org/tiny-llama": root / "llama"}


@pytest.fixture
def hub(repos, tmp_path, monkeypatch):
    with Hub(repos, gated=("org/gated",)) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path / "vp"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        online(monkeypatch, True)
        yield h


def online(monkeypatch, on: bool):
    # huggingface_hub reads HF_HUB_OFFLINE once at import (constants.py); this process imported it already
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if on else "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", not on)


def test_reads_config_and_headers_not_weights(hub, repos, monkeypatch):
    spec = resolve_model("org/tiny-llava")
    local = load_model_dir(repos["org/tiny-llava"])
    assert count_params(spec).total == count_params(local).total
    assert spec.stored_total_bytes == local.stored_total_bytes > 100_000  # exact, from the remote headers
    assert spec.stored_bytes_by_dtype == local.stored_bytes_by_dtype
    assert spec.vision is not None and spec.image_tokens == local.image_tokens
    assert spec.name == "org/tiny-llava" and spec.hf_ids == {"llava": "org/tiny-llava"} and spec.path is None
    assert hub.weight_bytes == 0  # the Range requests stop at the header
    ranges = [r for r in hub.requests if r.endswith(".safetensors bytes=0-7")]
    index = json.loads((repos["org/tiny-llava"] / "model.safetensors.index.json").read_text())
    assert len(ranges) == len(set(index["weight_map"].values())) > 1
    snap = hub_snapshot()
    assert (snap / "preprocessor_config.json").is_file() and not list(snap.glob("*.safetensors"))
    # offline now: the same answer from the caches, no request
    n = len(hub.requests)
    online(monkeypatch, False)
    again = resolve_model("org/tiny-llava")
    assert again.stored_total_bytes == spec.stored_total_bytes and len(hub.requests) == n
    # a revision: the commit itself
    assert resolve_model(f"org/tiny-llava@{COMMIT}").stored_total_bytes == spec.stored_total_bytes


def hub_snapshot():
    return next((Path(os.environ["HF_HUB_CACHE"]) / "models--org--tiny-llava" / "snapshots").iterdir())


def test_single_file_llm_and_unreachable_hub(hub, monkeypatch):
    spec = resolve_model("org/tiny-llama")
    assert spec.vision is None and spec.stored_total_bytes > 0 and hub.weight_bytes == 0
    # the hub goes away: the cached answer, then for an uncached id one line
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model("org/tiny-llama").stored_total_bytes == spec.stored_total_bytes
    with pytest.raises(UsageError, match="cannot reach the Hugging Face hub"):
        resolve_model("org/tiny-llava")


def test_offline_without_cache_says_how_to_fetch(hub, monkeypatch):
    online(monkeypatch, False)
    with pytest.raises(UsageError) as e:
        resolve_model("org/tiny-llama")
    assert e.value.exit_code == 2 and "HF_HUB_OFFLINE" in e.value.message
    assert "HF_HUB_OFFLINE=0 vramplan estimate --model org/tiny-llama" in e.value.hint
    assert hub.requests == []


def test_errors_are_one_line(hub):
    with pytest.raises(UsageError, match="no such model on the Hugging Face hub"):
        resolve_model("org/misspelled")
    with pytest.raises(UsageError, match="refused access") as e:
        resolve_model("org/gated")
    assert "HF_TOKEN" in e.value.hint and "hf auth login" in e.value.hint
    with pytest.raises(UsageError, match="no such revision"):
        resolve_model("org/tiny-llama@nope")
    assert hub.weight_bytes == 0


def test_cli_estimate_from_hub_and_offline_exit_2(hub, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "vramplan", "estimate", "--model", "org/tiny-llama", "--gpus", "1x24GB"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") <= 3 and "Traceback" not in r.stderr
    assert "HF_HUB_OFFLINE=0 vramplan estimate --model org/tiny-llama" in r.stderr
    r = subprocess.run(cmd, env=dict(env, HF_HUB_OFFLINE="0"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert hub.weight_bytes == 0
