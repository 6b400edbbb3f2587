"""bitsandbytes' MatMul4Bit saved inputs, a version-dependent mechanism (docs/estimate.md#activations):
releases before 0.43.2 keep every 4-bit Linear's input for backward (Job.kbit_saves_inputs, --bnb-version)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vramplan.errors import UsageError
from vramplan.estimate.activations import activation_bytes
from vramplan.estimate.priors import BNB_DROPS_KBIT_INPUT
from vramplan.plan.request import EstimateOptions, options_from_kwargs, version_tuple
from vramplan.plan.resolve import PINNED_BNB, build_job
from vramplan.plan.service import run_estimate

ROOT = Path(__file__).resolve().parents[2]
HOST = {"cpu_ram": "512GiB", "disk": "2TB"}
QV = "q_proj,v_proj"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _job(**kw):
    return build_job(options_from_kwargs(gpus="1x80G", recipe="qlora", **HOST, **kw))


def _saved_per_token_layer(job, kbit: bool, attn: str = "sdpa") -> float:
    r, m = job.recipe, job.model
    a = activation_bytes(m.text, None, micro_batch=1, seq=job.seq_len, images_per_sample=0, llm_mode="lora",
                         llm_lora=r.llm_lora, vision_lora=None, grad_ckpt=False, attn=attn,
                         kbit_saves_inputs=kbit)
    return a.llm_saved / (m.text.num_layers * job.seq_len)


def test_qv_lora_adds_exactly_the_frozen_4bit_inputs():
    job, _ = _job(lora_targets=QV, lora_dropout=0.0)
    t = job.model.text
    extra = _saved_per_token_layer(job, True) - _saved_per_token_layer(job, False)
    # o_proj reads SDPA's saved output; gate/up read the MLP norm's output (2h), down the SwiGLU product (2i)
    assert extra == 2 * t.hidden_size + 2 * t.intermediate_size
    # with dropout lora_A keeps the dropped copy, so q/v's base Linears keep the attention norm's output too
    job_d, _ = _job(lora_targets=QV, lora_dropout=0.05)
    assert _saved_per_token_layer(job_d, True) - _saved_per_token_layer(job_d, False) == \
        4 * t.hidden_size + 2 * t.intermediate_size
    # eager attention: o_proj's input is a fresh tensor (transpose(1, 2).contiguous() of probs @ V)
    assert _saved_per_token_layer(job, True, "eager") - _saved_per_token_layer(job, False, "eager") == \
        2 * t.hidden_size + 2 * t.intermediate_size + 2 * t.q_dim


def test_all_linear_lora_without_dropout_adds_nothing():
    job, _ = _job(lora_targets=ALL, lora_dropout=0.0)
    assert _saved_per_token_layer(job, True) == _saved_per_token_layer(job, False)


@pytest.mark.parametrize("ver,saves", [("0.41.0", True), ("0.43.1", True), ("0.41.0.post2", True),
                                       ("0.43.2", False), ("0.43.3", False), ("0.50.2", False), ("1.0", False)])
def test_the_version_sets_the_job_flag(ver, saves):
    job, ctx = _job(lora_targets=QV, bnb_version=ver)
    assert job.kbit_saves_inputs is saves
    assert any(f"bitsandbytes {ver} (--bnb-version)" in a for a in ctx.assumptions)


def test_threshold_and_pin():
    assert version_tuple("0.43.1") < BNB_DROPS_KBIT_INPUT <= version_tuple("0.43.2")
    pinned = re.search(r"^bitsandbytes==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pinned == PINNED_BNB


def test_installed_or_pinned_version_by_default(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    job, ctx = _job(lora_targets=QV)
    assert job.kbit_saves_inputs is False
    assert any("not installed: the pinned version assumed" in a for a in ctx.assumptions)
    monkeypatch.setattr(md, "version", lambda name: "0.42.0")
    job, ctx = _job(lora_targets=QV)
    assert job.kbit_saves_inputs is True and any("0.42.0 (installed)" in a for a in ctx.assumptions)


def test_old_bitsandbytes_raises_the_qlora_estimate_only():
    kw = dict(gpus="1x80G", **HOST, lora_targets=QV, micro_batch=1, zero="none", grad_ckpt=False)
    old = run_estimate(EstimateOptions(recipe="qlora", bnb_version="0.41.0", **kw)).candidates[0]
    new = run_estimate(EstimateOptions(recipe="qlora", bnb_version="0.43.3", **kw)).candidates[0]
    assert old.vram_breakdown["activations_saved"] > new.vram_breakdown["activations_saved"]
    lora_old = run_estimate(EstimateOptions(recipe="lora", bnb_version="0.41.0", **kw)).candidates[0]
    lora_new = run_estimate(EstimateOptions(recipe="lora", bnb_version="0.43.3", **kw)).candidates[0]
    assert lora_old.vram_per_gpu_bytes == lora_new.vram_per_gpu_bytes  # no 4-bit Linears


@pytest.mark.parametrize("bad", ["abc", "0", "", "x.1.2"])
def test_bad_version_is_refused_naming_the_flag(bad):
    with pytest.raises(UsageError, match="--bnb-version"):
        EstimateOptions(bnb_version=bad)

