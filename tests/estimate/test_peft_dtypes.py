"""--trainable-dtype peft: what HF Trainer + peft leave without DeepSpeed, fp32 adapters (peft cast_adapter_dtype)
and modules_to_save copies in the model's dtype (peft ModulesToSaveWrapper deep-copies the original module)."""

from __future__ import annotations

from vramplan.estimate.param_groups import param_groups
from vramplan.plan.request import EstimateOptions
from vramplan.plan.resolve import build_job
from vramplan.plan.service import run_estimate

KW = dict(model="llama-3-8b-instruct", recipe="lora", zero="none", micro_batch=1, seq_len=1024, grad_ckpt=True,
          gpus="1xA100-80G", headroom=0.0, modules_to_save="embed_tokens,lm_head")


def _cand(dtype):
    return run_estimate(EstimateOptions(trainable_dtype=dtype, **KW)).candidates[0]


def test_copies_in_the_model_dtype_adapters_in_fp32():
    job, _ = build_job(EstimateOptions(trainable_dtype="peft", **KW))
    g = param_groups(job.model, job.recipe)
    adapters, copies = g.trainable_llm_lora, g.trainable - g.trainable_llm_lora
    assert copies == 2 * job.model.text.vocab_size * job.model.text.hidden_size
    fp32, peft, bf16 = (_cand(d).vram_breakdown for d in ("fp32", "peft", "bf16"))
    assert peft["weights_trainable"] == adapters * 4 + copies * 2
    assert peft["gradients"] == peft["weights_trainable"]
    assert peft["optimizer_states"] == 2 * peft["weights_trainable"]  # adamw_torch: m, v in the weights' dtype
    assert bf16["weights_trainable"] < peft["weights_trainable"] < fp32["weights_trainable"]
    # autocast casts only the fp32 adapters: the 16-bit copies need no cast copy
    assert peft["autocast_weight_casts"] == adapters * 2 < fp32["autocast_weight_casts"]


def test_same_as_fp32_without_full_copies():
    kw = dict(KW, modules_to_save=None)
    a = run_estimate(EstimateOptions(trainable_dtype="peft", **kw)).candidates[0]
    b = run_estimate(EstimateOptions(trainable_dtype="fp32", **kw)).candidates[0]
    assert a.vram_breakdown == b.vram_breakdown
