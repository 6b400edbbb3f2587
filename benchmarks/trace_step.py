"""Trace one real-size training step of the bundled trainer on CPU and put it next to vramplan's estimate.

    python benchmarks/trace_step.py --model llava-llama3-8b-instruct --recipe qlora --seq-len 2048 --micro-batch 1

Traced (train/trace.py, FakeTensorMode, nothing computed): transformers' Llama/LLaVA model, bitsandbytes NF4
Linear4bit, peft LoRA as train.model.prepare applies it, gradient checkpointing, the loss, HF Trainer's
compute_loss + backward; two micro-steps (the second with the first one's gradients alive).
Emulated as torch ops with the same allocations: DeepSpeed's ZeRO-0 bf16 engine (module cast to bf16, the
bucketed gradient all-reduce, FP16_Optimizer's fp32 gradient flattening, FusedAdam), or with --engine plain
torch AdamW + autocast; bitsandbytes' CUDA dequant buffer in gemm_4bit.
Compared with vramplan's candidate on 1 GPU (ZeRO-0, or plain PyTorch with --engine plain; the same
micro-batch, sequence and checkpointing): weights and gradients (unrounded bytes), the forward/backward
activations + transients, and the step peak of model + gradients + activations. The optimizer step is
printed too (docs/estimate.md#checked-against-reality). --layers N traces N decoder layers (a quick look; the estimate
is made for the same N). Exit 0; 2 on a bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GiB = 2**30
FWD_BWD = ("forward", "loss", "loss backward", "backward")
STATES = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer_states", "buffers",
          "inputs")


def vramplan_job(model: str, recipe: str, seq: int, micro: int, ckpt: bool, attn: str, layers: int | None,
                 targets: str | None = None, engine: str = "deepspeed"):
    """vramplan's Job for the run (1 GPU, ZeRO-0, or plain PyTorch for engine "plain") and its candidate."""
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.resolve import build_job

    job, _ = build_job(EstimateOptions(model=model, recipe=recipe, gpus="1x141G", seq_len=seq, micro_batch=micro,
                                       grad_ckpt=ckpt, attn=attn, zero=0, offload="none", cpu_ram="1TiB",
                                       disk="100TB"))
    if layers:
        job = replace(job, model=replace(job.model, text=replace(job.model.text, num_layers=layers)))
    if targets and job.recipe.llm_lora:
        job = replace(job, recipe=replace(job.recipe, llm_lora=replace(job.recipe.llm_lora,
                                                                         targets=tuple(targets.split(",")))))
    return job, candidate(job, micro, ckpt, engine)


def candidate(job, micro: int, ckpt: bool, engine: str = "deepspeed"):
    """vramplan's evaluated candidate on 1 GPU: DeepSpeed ZeRO-0, or plain PyTorch ("torch") for "plain"."""
    from vramplan.estimate.param_groups import param_groups
    from vramplan.estimate.search import evaluate
    from vramplan.estimate.types import Strategy

    s = Strategy(0, "none", 1, 1, micro, 1, ckpt, "torch" if engine == "plain" else "deepspeed")
    return evaluate(job, param_groups(job.model, job.recipe), s)


def trace_job(job, ckpt: bool, micro: int, engine: str):
    """train.trace.TraceJob of a vramplan Job (HF config kwargs from the profile's specs)."""
    from train.trace import TraceJob

    t, v = job.model.text, job.model.vision
    text = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                vocab_size=t.vocab_size, head_dim=t.d_head, tie_word_embeddings=t.tie_word_embeddings,
                attention_bias=t.attention_bias, mlp_bias=t.mlp_bias, max_position_embeddings=t.max_position_embeddings)
    vision = None
    if v is not None:
        vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                      num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size)
    r = job.recipe
    return TraceJob(text=text, vision=vision, quant=job.quant, double_quant=r.double_quant, llm_lora=r.llm_lora,
                    vision_lora=r.vision_lora if v is not None else None, train_projector=r.train_projector,
                    micro_batch=micro, seq=job.seq_len, images_per_sample=1 if v is not None else 0,
                    grad_ckpt=ckpt, attn=job.attn, engine=engine, trainable_dtype=r.trainable_dtype,
                    kbit_embed_dtype=r.kbit_embed_dtype)


def compare(trace: dict, cand) -> list[tuple[str, int, int]]:
    """(component, traced bytes, estimated bytes) rows."""
    ph, est = trace["phases"], cand.vram_breakdown
    fb = [ph[p] for p in FWD_BWD if p in ph]
    top = max(fb, key=lambda x: x["peak"])
    act_traced = max(x["peak"] - sum(x[k] for k in STATES) for x in fb)
    casts = est.get("autocast_weight_casts", 0)  # saved for backward, or held through the forward only
    act_est = max(est["activations_saved"] + (0 if cand.strategy.grad_ckpt else casts)
                  + max(est["logits_loss_peak"], est.get("recompute_layer", 0) + est.get("dequant_transient", 0)),
                  est["activations_saved"] + casts + est.get("logits_loss_forward", 0),
                  est.get("vision_forward_transient", 0))
    model_est = sum(est.get(k, 0) for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients"))
    grads = ph.get("all-reduce", top)["raw"]["gradients"]  # every trainable parameter has one there
    rows = [("weights_quantized", trace["params"]["weights_quantized"], est.get("weights_quantized", 0)),
            ("weights_frozen", trace["params"]["weights_frozen"], est["weights_frozen"]),
            ("weights_trainable", trace["params"]["weights_trainable"], est["weights_trainable"]),
            ("gradients", grads, est["gradients"]),
            ("activations + transients (fwd/bwd)", act_traced, act_est),
            ("step peak: weights + gradients + activations",
             max(x["peak"] - x["optimizer_states"] - x["buffers"] - x["inputs"] for x in fb), model_est + act_est),
            ("optimizer states", top["optimizer_states"], est["optimizer_states"] + est.get("fp32_grad_partition", 0)),
            ("whole-step peak allocated (" + trace["peak_phase"] + " / " + cand.peak_phase + ")", trace["peak"],
             cand.vram_allocated_per_gpu_bytes)]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llava-llama3-8b-instruct", help="model profile (profiles/models)")
    ap.add_argument("--recipe", default="qlora", help="recipe profile (profiles/recipes)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    ap.add_argument("--engine", choices=("deepspeed", "plain"), default="deepspeed")
    ap.add_argument("--layers", type=int, help="trace this many decoder layers instead of the profile's")
    ap.add_argument("--lora-targets", help="LLM LoRA target modules instead of the recipe's, e.g. q_proj,v_proj")
    ap.add_argument("--json", action="store_true", help="print the trace and the comparison as JSON")
    a = ap.parse_args(argv)
    from vramplan.errors import UsageError

    try:
        job, cand = vramplan_job(a.model, a.recipe, a.seq_len, a.micro_batch, a.grad_ckpt, a.attn, a.layers,
                                 a.lora_targets, a.engine)
    except UsageError as e:
        print(f"error: {e.message}" + (f" ({e.hint})" if e.hint else ""), file=sys.stderr)
        return 2
    from train.trace import trace_step

    t0 = time.time()
    trace = trace_step(trace_job(job, a.grad_ckpt, a.micro_batch, a.engine))
    rows = compare(trace, cand)
    if a.json:
        keys = ("component", "traced", "estimated")
        print(json.dumps({"trace": trace, "rows": [dict(zip(keys, r, strict=True)) for r in rows],
                          "seconds": round(time.time() - t0, 1)}, indent=1))
        return 0
    print(f"{job.model.name}, {a.recipe}, seq {job.seq_len}, micro-batch {a.micro_batch}, checkpointing "
          f"{'on' if a.grad_ckpt else 'off'}, {job.model.text.num_layers} layers, engine {a.engine} "
          f"(traced in {time.time() - t0:.0f} s)")
    print(f"{'phase':<16} {'peak GiB':>9}  " + " ".join(f"{k[:12]:>12}" for k in ("activations", "transients",
                                                                                   "gradients", "optimizer_st")))
    for p, v in trace["phases"].items():
        print(f"{p:<16} {v['peak'] / GiB:9.3f}  " + " ".join(f"{v[k] / GiB:12.3f}" for k in (
            "activations", "transients", "gradients", "optimizer_states")))
    print(f"\n{'component':<58} {'traced GiB':>11} {'vramplan GiB':>13} {'error':>8}")
    for name, tr, es in rows:
        err = f"{(es - tr) / tr:+.1%}" if tr else "-"
        print(f"{name:<58} {tr / GiB:11.3f} {es / GiB:13.3f} {err:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
