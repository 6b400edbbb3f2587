"""`--task infer`: every weight dtype (stored, int8, nf4) per GPU count, the pick rule, per-GPU and total VRAM."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vramplan.estimate.inference import infer_dtypes, weight_bytes
from vramplan.estimate.param_groups import int8_tensor_bytes, nf4_tensor_bytes, param_groups
from vramplan.estimate.params import count_params, linear_groups
from vramplan.estimate.priors import ALLOCATOR_RESERVE_FACTOR, CUDA_CONTEXT_BYTES
from vramplan.plan.request import EstimateOptions
from vramplan.plan.resolve import build_job
from vramplan.plan.service import run_inference_estimate

GiB = 2**30


def infer(**kw) -> dict:
    return run_inference_estimate(EstimateOptions(task="infer", **kw))


def rows(d: dict, dtype: str) -> list[dict]:
    return [c for c in d["candidates"] if c["dtype"] == dtype]


def test_every_dtype_per_gpu_count_most_precise_first():
    d = infer(gpus="2x24G")
    assert d["dtypes"] == ["fp16", "int8", "nf4"]  # the profile's stored dtype is fp16 (config.json float16)
    assert [(c["dtype"], c["gpus"]) for c in d["candidates"]] == [
        ("fp16", 1), ("fp16", 2), ("int8", 1), ("int8", 2), ("nf4", 1), ("nf4", 2)]
    w = [rows(d, t)[0]["vram_breakdown"]["weights"] for t in d["dtypes"]]
    assert w[0] > w[1] > w[2]
    # decoding reads every weight, but bitsandbytes' k-bit Linears add host ops per layer (issue #13): fewer bytes
    # do not buy proportionally more tokens/s
    tps = [rows(d, t)[0]["time_detail"]["decode_tokens_per_s"] for t in d["dtypes"]]
    assert all(t > 0 for t in tps)
    assert tps[2] < tps[0] * w[0] / w[2] and tps[1] < tps[0] * w[0] / w[1]
    terms = rows(d, "nf4")[0]["time_detail"]["decode_terms_s_per_token"]
    assert set(terms) == {"weights", "attention", "host_ops"}
    assert terms["host_ops"] > rows(d, "fp16")[0]["time_detail"]["decode_terms_s_per_token"]["host_ops"]


def test_fp16_does_not_fit_a_24gb_card_at_8k_context_int8_is_picked():
    # planned for the A10 (22.49 GiB reported, 20.24 GiB usable at 10% headroom): the 15.6 GiB of fp16 weights,
    # 1 GiB of KV cache, the prefill temporaries and the CUDA context come to about 20.3 GiB
    d = infer(gpus="1x24G", context=8192)
    fp16, int8 = rows(d, "fp16")[0], rows(d, "int8")[0]
    assert fp16["vram_breakdown"]["weights"] / GiB == pytest.approx(15.56, abs=0.01)
    assert fp16["vram_breakdown"]["kv_cache"] == 2 * 32 * 1024 * 2 * 8192
    assert 20.24 < fp16["vram_per_gpu_bytes"] / GiB < 20.5 and not fp16["fits"]
    assert d["candidates"][d["pick"]] is not None and d["candidates"][d["pick"]]["dtype"] == "int8"
    assert int8["fits"] and int8["vram_per_gpu_bytes"] / GiB == pytest.approx(13.0, abs=0.1)
    assert d["pick_reason"].startswith("fp16 does not fit on 1 GPU (needs 20.")
    assert "int8 fits on 1 GPU" in d["pick_reason"]
    # at 4096 tokens the same card holds fp16
    d4 = infer(gpus="1x24G", context=4096)
    assert d4["candidates"][d4["pick"]]["dtype"] == "fp16"


def test_a100_80g_picks_the_stored_dtype():
    d = infer(gpus="1xA100-80G", context=8192)
    c = d["candidates"][d["pick"]]
    assert (c["dtype"], c["gpus"]) == ("fp16", 1)
    assert d["pick_reason"].startswith("fp16 fits on 1 GPU")


def test_more_gpus_in_the_stored_dtype_beat_fewer_in_a_quantized_one():
    d = infer(gpus="2x24G", context=8192, batch=4)
    c = d["candidates"][d["pick"]]
    assert (c["dtype"], c["gpus"]) == ("fp16", 2)
    assert rows(d, "int8")[0]["fits"]  # int8 would fit on one card, but fp16 is more precise
    assert "1 GPU would need" in d["pick_reason"]


def test_quant_narrows_to_one_dtype():
    d = infer(gpus="1x24G", quant="nf4")
    assert d["dtypes"] == ["nf4"] and {c["dtype"] for c in d["candidates"]} == {"nf4"}
    assert infer(gpus="1x24G", quant="int8")["dtypes"] == ["int8"]
    assert infer(gpus="1x24G", quant="none")["dtypes"] == ["fp16"]


def test_multi_gpu_rows_show_per_gpu_and_total():
    d = infer(gpus="2x24G", context=8192, batch=4)
    for t in d["dtypes"]:
        one, two = rows(d, t)
        assert one["vram_total_bytes"] == one["vram_per_gpu_bytes"]
        assert two["vram_per_gpu_bytes"] < two["vram_total_bytes"] <= 2 * two["vram_per_gpu_bytes"]
        # the two GPUs hold the same weights and KV cache as one: the total adds one more CUDA context and
        # one more GPU's prefill temporaries
        extra = CUDA_CONTEXT_BYTES + one["vram_breakdown"]["prefill_transient"] * ALLOCATOR_RESERVE_FACTOR
        assert two["vram_total_bytes"] == pytest.approx(one["vram_total_bytes"] + extra, abs=4)


def test_ascend_offers_no_kbit_rows():
    d = infer(gpus="8x910B")
    assert d["dtypes"] == ["fp16"]
    assert [c["gpus"] for c in d["candidates"]] == [1, 2, 4, 8]
    assert any("bitsandbytes has no int8/nf4 kernels" in a for a in d["assumptions"])
    assert not any("LoRA" in a for a in d["assumptions"])  # the training fallback note does not apply
    assert infer(gpus="8x910B", quant="nf4")["dtypes"] == ["fp16"]


def test_bf16_weights_load_as_fp16_without_bf16():
    job, _ = build_job(EstimateOptions(task="infer", gpus="1xV100-32G", model="llama-3-8b-instruct", quant="none"))
    dtypes, notes = infer_dtypes(job, None)
    assert dtypes == ["fp16", "int8", "nf4"] and any("load as fp16" in n for n in notes)


def test_kbit_weight_bytes_are_param_groups_exact_storage():
    job, _ = build_job(EstimateOptions(task="infer", gpus="1x24G", quant="none"))
    m = job.model
    c = count_params(m)
    llm = [g for g in linear_groups(m) if g.component == "llm"]
    q_params = sum(g.d_in * g.d_out * g.count for g in llm)
    rest = (c.total - q_params) * 2
    int8 = sum(int8_tensor_bytes(g.d_in, g.d_out) * g.count for g in llm)
    nf4 = sum(int(nf4_tensor_bytes(g.d_in * g.d_out, job.recipe.double_quant)) * g.count for g in llm)
    assert weight_bytes(job, "int8") == int8 + rest
    assert weight_bytes(job, "nf4") == nf4 + rest
    assert weight_bytes(job, "nf4") == param_groups(m, replace(job.recipe, quant="nf4")).quantized_bytes + rest
    assert weight_bytes(job, "fp16") == c.total * 2
    # the one-GPU rows hold every weight
    d = infer(gpus="1x24G")
    for t in d["dtypes"]:
        assert rows(d, t)[0]["vram_breakdown"]["weights"] == weight_bytes(job, t)


def test_prompt_prefills_only_the_prompt_the_kv_cache_holds_the_context():
    """--prompt: the prompt is prefilled at once, the rest of --context is generated token by token (transformers
    generate), so the prefill temporaries follow the prompt and the KV cache the whole context."""
    full = rows(infer(gpus="1x80G", context=2049, quant="none"), "fp16")[0]
    short = rows(infer(gpus="1x80G", context=2049, prompt=1, quant="none"), "fp16")[0]
    assert short["vram_breakdown"]["kv_cache"] == full["vram_breakdown"]["kv_cache"]
    assert short["vram_breakdown"]["prefill_transient"] * 2049 == full["vram_breakdown"]["prefill_transient"]
    for bad in (dict(task="infer", context=64, prompt=65), dict(task="train", prompt=8), dict(task="infer", prompt=0)):
        with pytest.raises(Exception, match="--prompt"):
            EstimateOptions(**bad)
