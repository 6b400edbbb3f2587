"""--kbit-embed-dtype bf16: k-bit training without DeepSpeed whose trainer casts the frozen embeddings and lm_head
back to bf16 after peft's prepare_model_for_kbit_training upcast them (TRL's SFTTrainer under bf16:
trl trainer/utils.py peft_module_casting_to_bf16; artidoro/qlora's qlora.py). The trace of the real program
holds it in tests/trace/test_plain_autocast.py; here the arithmetic and where it applies."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vramplan.errors import UsageError
from vramplan.estimate.search import _embeddings_cast_back
from vramplan.estimate.types import Strategy
from vramplan.plan.request import EstimateOptions
from vramplan.plan.resolve import build_job
from vramplan.plan.service import run_estimate

KW = dict(model="llama-3-8b-instruct", recipe="qlora", zero="none", micro_batch=1, seq_len=2048, grad_ckpt=True,
          gpus="1xA100-80G", headroom=0.0)


def _cand(**kw):
    return run_estimate(EstimateOptions(**{**KW, **kw})).candidates[0]


def test_embeddings_and_head_back_in_bf16_and_no_head_copy():
    job, _ = build_job(EstimateOptions(**KW))
    t = job.model.text
    emb_head = 2 * t.vocab_size * t.hidden_size  # untied
    fp32, bf16 = _cand().vram_breakdown, _cand(kbit_embed_dtype="bf16").vram_breakdown
    assert fp32["weights_frozen"] - bf16["weights_frozen"] == emb_head * (4 - 2)
    # the lm_head is bf16 already: autocast makes no 16-bit copy of it in either loss peak
    assert fp32["logits_loss_peak"] - bf16["logits_loss_peak"] == t.vocab_size * t.hidden_size * 2
    assert fp32["logits_loss_forward"] - bf16["logits_loss_forward"] == t.vocab_size * t.hidden_size * 2
    for k in ("weights_quantized", "weights_trainable", "gradients", "optimizer_states", "activations_saved"):
        assert fp32[k] == bf16[k], k


def test_only_k_bit_plain_pytorch():
    # DeepSpeed casts the whole module to bf16 anyway; without quantization nothing was upcast
    for kw in (dict(zero=0), dict(recipe="lora")):
        assert _cand(**kw).vram_breakdown == _cand(kbit_embed_dtype="bf16", **kw).vram_breakdown, kw


def test_tied_embeddings_count_once():
    job, _ = build_job(EstimateOptions(**KW, kbit_embed_dtype="bf16"))
    s = Strategy(0, "none", 1, 1, 1, 1, True, engine="torch")
    t = job.model.text
    untied = _embeddings_cast_back(job, s)
    tied = replace(job, model=replace(job.model, text=replace(t, tie_word_embeddings=True)))
    assert untied == 2 * _embeddings_cast_back(tied, s) == 2 * t.vocab_size * t.hidden_size
    assert _embeddings_cast_back(job, replace(s, engine="deepspeed")) == 0


def test_flag_checked_and_carried_to_the_plan():
    with pytest.raises(UsageError, match="--kbit-embed-dtype: must be fp32 or bf16"):
        EstimateOptions(kbit_embed_dtype="fp16")
    with pytest.raises(UsageError, match="--kbit-embed-dtype with --task infer"):
        EstimateOptions(task="infer", kbit_embed_dtype="bf16")
    from vramplan.plan.service import plan_from_options

    plan = plan_from_options(EstimateOptions(**KW, kbit_embed_dtype="bf16"))
    assert json.loads(json.dumps(plan))["recipe"]["kbit_embed_dtype"] == "bf16"


def test_said_when_it_changes_nothing():
    for kw, why in ((dict(recipe="lora"), "no k-bit weights here"), (dict(zero=2), "DeepSpeed casts the whole module")):
        _, ctx = build_job(EstimateOptions(**{**KW, **kw}, kbit_embed_dtype="bf16"))
        assert any(a.startswith("--kbit-embed-dtype bf16 changes only") and why in a for a in ctx.assumptions), kw
    _, ctx = build_job(EstimateOptions(**KW, kbit_embed_dtype="bf16"))
    assert not any("--kbit-embed-dtype" in a for a in ctx.assumptions)
