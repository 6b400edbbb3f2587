"""State-side mechanisms: optimizer kinds, the plain-PyTorch engine, DeepSpeed's step transients,
modules_to_save / lm_head LoRA (vramplan/estimate/optimizers.py, gpu_memory.py)."""

from __future__ import annotations

import pytest

from vramplan.estimate.activations import ActivationBreakdown
from vramplan.estimate.ds_config import make_ds_config
from vramplan.estimate.gpu_memory import gpu_memory
from vramplan.estimate.optimizers import state_bytes
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.types import DsBuckets, Strategy
from vramplan.plan.request import EstimateOptions
from vramplan.plan.service import run_estimate

T = 100_000_000
ACT = ActivationBreakdown(0, 0, 0, 0, 0, 0, 0)
B = DsBuckets(0, 0, False, 0, 0)


def groups(trainable=T, frozen=0, quantized_bytes=0):
    return ParamGroups(0, quantized_bytes, 0, frozen, trainable, 0, 0, 0, trainable + frozen, 0, 0)


def mem(engine="deepspeed", stage=0, optimizer="adamw_torch", tb=4, offload="none", **g):
    return gpu_memory(groups(**g), ACT, Strategy(stage, offload, 1, 1, 1, 1, True, engine), B, optimizer=optimizer,
                      trainable_bytes=tb).as_dict()


def test_optimizer_state_bytes():
    assert state_bytes("adamw_torch", 4) == 8 and state_bytes("adamw_torch", 2) == 4
    assert state_bytes("adamw_8bit", 4) == pytest.approx(2 * (1 + 4 / 256))
    assert state_bytes("paged_adamw_32bit", 2) == 8  # bitsandbytes 32-bit states are fp32 always


def test_plain_torch_has_no_master_and_states_follow_the_weights():
    d = mem("torch", tb=4)
    assert d["weights_trainable"] == 4 * T and d["gradients"] == 4 * T and d["optimizer_states"] == 8 * T
    b = mem("torch", tb=2)
    assert b["weights_trainable"] == 2 * T and b["gradients"] == 2 * T and b["optimizer_states"] == 4 * T
    e = mem("torch", optimizer="adamw_8bit")
    assert e["optimizer_states"] == int(T * 2 * (1 + 4 / 256)) and e["optimizer_step_transient"] == 0
    p = mem("torch", optimizer="paged_adamw_8bit")
    assert "optimizer_states" not in p and p["optimizer_states_paged"] > 0  # managed memory, not in the peak


def test_deepspeed_zero0_fp32_grads_are_a_step_transient():
    d = mem("deepspeed", 0)
    assert d["optimizer_states"] == 12 * T and d["gradients"] == 2 * T
    assert d["optimizer_step_transient"] == 8 * T and "fp32_grad_partition" not in d
    e = mem("deepspeed", 0, optimizer="adamw_8bit")
    assert e["optimizer_states"] == int(T * (4 + 2 * (1 + 4 / 256)))  # fp32 master + 8-bit states


def test_kbit_plain_keeps_frozen_weights_fp32():
    assert mem("torch", frozen=10, quantized_bytes=5)["weights_frozen"] == 40
    assert mem("deepspeed", frozen=10, quantized_bytes=5)["weights_frozen"] == 20


def test_ds_config_leaves_the_optimizer_to_the_trainer_for_8bit():
    s = Strategy(2, "none", 1, 1, 1, 1, True)
    b = DsBuckets(1, 1, True, 1, 1)
    assert "optimizer" in make_ds_config(s, b, compute_dtype="bf16", hidden_size=8)
    assert "optimizer" not in make_ds_config(s, b, compute_dtype="bf16", hidden_size=8, optimizer="adamw_8bit")


def _est(**kw):
    return run_estimate(EstimateOptions(gpus="1xA100-80G", cpu_ram="512GiB", disk="10TB", headroom=0.0, **kw))


def test_flags_reach_the_estimate():
    a = _est(model="llama-3-8b-instruct", recipe="lora", zero=0, micro_batch=1, grad_ckpt=True)
    b = _est(model="llama-3-8b-instruct", recipe="lora", zero=0, micro_batch=1, grad_ckpt=True, optimizer="adamw_8bit")
    sa = {c.strategy.engine: c.vram_breakdown["optimizer_states"] for c in a.candidates}
    sb = {c.strategy.engine: c.vram_breakdown["optimizer_states"] for c in b.candidates}
    assert sb["deepspeed"] < sa["deepspeed"]  # the recipe's optimizer counts now
    plain = _est(model="llama-3-8b-instruct", recipe="lora", zero="none", micro_batch=1, grad_ckpt=True)
    assert {c.strategy.engine for c in plain.candidates} == {"torch"}
    assert all(c.ds_config is None for c in plain.candidates)
    qv = _est(model="llama-3-8b-instruct", recipe="lora", zero="none", micro_batch=1, grad_ckpt=True,
              lora_targets="q_proj,v_proj")
    head = _est(model="llama-3-8b-instruct", recipe="lora", zero="none", micro_batch=1, grad_ckpt=True,
                lora_targets="q_proj,v_proj,lm_head")
    saved = _est(model="llama-3-8b-instruct", recipe="lora", zero="none", micro_batch=1, grad_ckpt=True,
                 lora_targets="q_proj,v_proj", modules_to_save="embed_tokens,lm_head")
    t = [r.data()["model"]["trainable_params"] for r in (qv, head, saved)]
    r = qv.job.recipe.llm_lora.r
    assert t[1] - t[0] == r * (4096 + 128256)
    assert t[2] - t[0] == 2 * 128256 * 4096


def test_bad_new_flags_name_themselves():
    from vramplan.errors import UsageError

    for kw, flag in ((dict(zero="x"), "--zero"), (dict(optimizer="sgd"), "--optimizer"),
                     (dict(trainable_dtype="fp8"), "--trainable-dtype"), (dict(lora_dropout=1.5), "--lora-dropout"),
                     (dict(modules_to_save="vision"), "--modules-to-save")):
        with pytest.raises(UsageError, match=flag):
            EstimateOptions(**kw)
