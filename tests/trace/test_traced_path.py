"""The traced path (docs/estimate.md#the-traced-path): `vramplan estimate` on an architecture no family module
derives runs `python -m train.trace_model` and plans from its JSON; `--trace` does so for a known family,
and the two agree within the trace tests' tolerances (tests/trace/test_trace_vs_estimate.py). Each traced
estimate is one subprocess of a tiny model; the cache makes the second one instant."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from vramplan.cli import cli
from vramplan.plan.traced import MISSING_EXTRA

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

FALCON = {"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 2, "vocab_size": 512, "new_decoder_architecture": False, "multi_query": True,
          "bias": False, "torch_dtype": "bfloat16"}
# tests/trace/test_trace_vs_estimate.py's reduced Llama-3 shape: the real vocabulary, 2 narrow layers
LLAMA = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 128256,
         "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
ONE_STEP = ["--gpus", "1x80G", "--micro-batch", "1", "--grad-ckpt", "--offload", "none", "--json"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE_DIR", str(tmp_path / "cache"))


def _dir(tmp_path, cfg, name="model"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _estimate(*args):
    r = CliRunner().invoke(cli, ["estimate", *args])
    assert "Traceback" not in r.output, r.output
    return r


def _one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vramplan: error:")]
    assert len(lines) == 1, r.output
    return lines[0]


def test_falcon_plans_through_the_trace_then_from_the_cache(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = _dir(tmp_path, FALCON)
    args = ["--model", str(d), "--seq-len", "256", "--zero", "2", "--lora-r", "8", *ONE_STEP]
    r = _estimate(*args)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)["data"]
    m = data["model"]
    assert m["family"] == "traced" and m["traced"]["architecture"] == "FalconForCausalLM"
    assert not m["traced"]["cached"] and m["traced"]["seconds"] > 0
    assert any("traced, not derived" in a and "traced in" in a for a in data["assumptions"])
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**FALCON))
    assert m["params"] == sum(p.numel() for p in ref.parameters())  # tied embedding once
    lora = 8 * (64 + 96 + 64 + 64 + 64 + 256 + 256 + 64) * 2  # r (d_in + d_out) on every Linear, 2 layers
    assert data["param_groups"]["trainable_llm_lora"] == lora
    pick = data["candidates"][data["pick"]]
    assert "traced" in pick["vram_formulas"]["activations_saved"]
    again = _estimate(*args)
    assert again.exit_code == 0, again.output
    m2 = json.loads(again.stdout)["data"]["model"]
    assert m2["traced"]["cached"] and m2["params"] == m["params"]
    assert json.loads(again.stdout)["data"]["candidates"] == data["candidates"]
    traced = json.loads(Path(m2["traced"]["cache_file"]).read_text())["steps"][0]["params"]
    for k in ("weights_quantized", "weights_frozen", "weights_trainable"):  # the derived states, to the byte
        assert pick["vram_breakdown"][k] == traced[k], (k, pick["vram_breakdown"][k], traced[k])


def test_traced_and_derived_llama_agree(tmp_path):
    """weights and gradients exact; the forward/backward activations + transients within 3%."""
    d = _dir(tmp_path, LLAMA)
    args = ["--model", str(d), "--seq-len", "1024", "--zero", "0", "--lora-r", "16", *ONE_STEP]
    derived, traced = (json.loads(_estimate(*args, *extra).stdout)["data"] for extra in ([], ["--trace"]))
    assert derived["model"]["traced"] is None and traced["model"]["traced"]["instead_of"] == "llama"
    a, b = (x["candidates"][x["pick"]]["vram_breakdown"] for x in (derived, traced))
    for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer_states"):
        assert a[k] == b[k], (k, a[k], b[k])

    def act(v):
        return v["activations_saved"] + max(v["logits_loss_peak"], v.get("recompute_layer", 0)
                                            + v.get("dequant_transient", 0))
    assert abs(act(a) - act(b)) <= 0.03 * act(b), (act(a), act(b), (act(a) - act(b)) / act(b))


def test_missing_train_extra_is_one_line(tmp_path, monkeypatch):
    """The subprocess cannot import torch (a stand-in package that raises ImportError)."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    r = _estimate("--model", str(_dir(tmp_path, FALCON)), *ONE_STEP[:-1])
    assert _one_error_line(r) == f"vramplan: error: {MISSING_EXTRA}"


def test_config_unknown_to_transformers_is_one_line(tmp_path):
    line = _one_error_line(_estimate("--model", str(_dir(tmp_path, {"model_type": "nosuchmodel"})), *ONE_STEP[:-1]))
    assert "'nosuchmodel' is unknown to transformers" in line
    line = _one_error_line(_estimate("--model", str(_dir(tmp_path, {"model_type": "no such"}, "b")), *ONE_STEP[:-1]))
    assert "is no transformers model type" in line


def test_hub_id_of_an_unknown_architecture_is_traced(tmp_path, monkeypatch):
    """A hub id (here from the Hugging Face cache, offline) reaches the traced path like a dir: the request
    carries its config.json."""
    from vramplan.inputs.model_dir import resolve_model
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.traced import trace_request

    snap = tmp_path / "hub" / "models--tiny--falcon" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(FALCON))
    (tmp_path / "hub" / "models--tiny--falcon" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--falcon" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiny/falcon").text.family == "traced"
    import vramplan.plan.resolve as resolve

    monkeypatch.setattr("vramplan.plan.traced.attach_trace", lambda job, ctx, train=True: job)  # no subprocess
    job, _ = resolve.build_job(EstimateOptions(model="tiny/falcon", gpus="1x24G", micro_batch=2, seq_len=128,
                                               grad_ckpt=False, zero=2))
    req = trace_request(job)
    assert req["config"] == FALCON and req["micro_batch"] == 2 and req["seq_len"] == 128
    assert req["steps"] == [{"engine": "deepspeed", "grad_ckpt": False}]
