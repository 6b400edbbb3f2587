"""Plain PyTorch under autocast (docs/estimate.md#activations): the fp32 residual stream of k-bit training,
the separate adapter input copies, autocast's weight-cast cache and the frozen fp32 lm_head's copy.
tests/trace/test_plain_autocast.py holds them against the traced step; here the arithmetic and the
real-size figures the trace gave (benchmarks/trace_step.py --engine plain, docs/estimate.md#whole-step-trace)."""

from __future__ import annotations

import pytest

from benchmarks.trace_step import candidate, vramplan_job
from vramplan.estimate.activations import llm_layer_bytes_per_token
from vramplan.estimate.specs import LoraSpec, TextSpec

GiB = 2**30
T = TextSpec(num_layers=1, hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=4096, head_dim=64)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_fp32_residual_keeps_the_swiglu_saves_in_fp32():
    lora = LoraSpec(16, 32, 0.05, ALL)
    bf16 = llm_layer_bytes_per_token(T, "lora", lora, "sdpa", 1024)
    fp32 = llm_layer_bytes_per_token(T, "lora", lora, "sdpa", 1024, residual_bytes=4, adapter_casts=True)
    assert bf16 == 32264  # the reduced trace's layer under DeepSpeed's bf16 cast
    assert fp32 - bf16 == 6 * T.intermediate_size  # the traced plain layer: 43336 B less 2r(d_in + d_out)/token
    assert llm_layer_bytes_per_token(T, "lora", lora, "sdpa", 1024, compute_bytes=4, residual_bytes=4) == 2 * bf16


def test_fp32_adapters_under_autocast_share_no_input():
    lora = LoraSpec(8, 16, 0.0, ALL)
    shared = llm_layer_bytes_per_token(T, "lora", lora, "sdpa", 64)
    own = llm_layer_bytes_per_token(T, "lora", lora, "sdpa", 64, adapter_casts=True)
    h, i, q = T.hidden_size, T.intermediate_size, T.q_dim
    assert own - shared == 2 * (5 * h + q + i) - (2 * h + 2 * h + 2 * i)  # every adapter keeps its own copy


@pytest.mark.parametrize("ckpt,act,peak,phase", [(False, 27.755, 55.024, "forward/backward"),
                                                 (True, 6.989, 34.258, "loss forward")])
def test_real_size_plain_qlora_matches_the_traced_step(ckpt, act, peak, phase):
    """Llama-3-8B QLoRA (r 512 all-linear), seq 2048, plain PyTorch: the traced figures within 1%."""
    job, cand = vramplan_job("llama-3-8b-instruct", "qlora", 2048, 1, ckpt, "sdpa", None, None, "plain")
    e = cand.vram_breakdown
    assert e["autocast_weight_casts"] == 2 * e["weights_trainable"] // 4  # a 16-bit copy of the fp32 adapters
    casts = 0 if ckpt else e["autocast_weight_casts"]
    est_act = max(e["activations_saved"] + casts + e["logits_loss_peak"],
                  e["activations_saved"] + e["autocast_weight_casts"] + e["logits_loss_forward"])
    assert est_act / GiB == pytest.approx(act, rel=0.01)
    assert cand.vram_allocated_per_gpu_bytes / GiB == pytest.approx(peak, rel=0.01)
    assert cand.peak_phase == phase
    ds = candidate(job, 1, ckpt, "deepspeed").vram_breakdown
    assert "autocast_weight_casts" not in ds and "logits_loss_forward" not in ds  # DeepSpeed casts the module


def test_pure_bf16_gets_no_upcast():
    from dataclasses import replace

    job, cand = vramplan_job("llama-3-8b-instruct", "qlora", 2048, 1, True, "sdpa", None, None, "plain")
    bf16 = replace(job, recipe=replace(job.recipe, trainable_dtype="bf16"))
    e = candidate(bf16, 1, True, "plain").vram_breakdown
    assert "autocast_weight_casts" not in e and "logits_loss_forward" not in e
    assert e["activations_saved"] * 2 < cand.vram_breakdown["activations_saved"] * 1.1  # bf16 layer inputs
