"""`--task infer`: weights + vision tower + KV cache, split over GPUs the way device_map="auto" does.

accelerate's infer_auto_device_map fills GPUs in module order (embeddings, vision tower and
projector first, then decoder layers, lm_head last), keeping whole decoder layers on one device.
KV cache (Transformer Math 101): 2 (K and V) x layers x kv_heads x d_head x bytes x tokens x batch.
Decoding is memory-bound: one token per sequence reads every weight once, so
tokens/s ~ batch x HBM bandwidth x efficiency / bytes read per step.
"""

from __future__ import annotations

from vramplan.estimate.gpu_memory import ALLOCATOR_RESERVE_FACTOR, CUDA_CONTEXT_BYTES
from vramplan.estimate.param_groups import param_groups
from vramplan.estimate.params import count_params
from vramplan.units import gib

HBM_EFFICIENCY = 0.6  # achieved fraction of HBM bandwidth in HF generate() decode (prior)


def run_inference_estimate(o) -> dict:
    from vramplan.plan.resolve import build_job
    from vramplan.plan.service import recipe_dict

    job, ctx = build_job(o)
    m, hw = job.model, job.hardware
    r = job.recipe
    # inference never trains: drop adapters/projector training from the groups; keep the quantization choice
    from dataclasses import replace

    r_inf = replace(r, llm_lora=None, vision_lora=None, train_projector=False, train_llm_full=False)
    g = param_groups(m, r_inf)
    c = count_params(m)
    bc = 2
    t = m.text
    layer_frac = (g.quantized_bytes / max(1, g.quantized_params)) if g.quantized_params else bc
    decoder_bytes_per_layer = int((c.llm_linear / t.num_layers) * layer_frac
                                  + (c.llm_norms / t.num_layers) * bc)
    first_bytes = (c.llm_embed + c.vision_total + c.projector) * bc
    last_bytes = (c.llm_lm_head + t.hidden_size) * bc
    kv_per_layer = 2 * t.kv_dim * bc * o.context * o.batch
    logits = o.batch * t.vocab_size * 4  # last-token logits (generate keeps 1 position), fp32
    prefill = o.batch * o.context * (t.hidden_size * 4 + t.intermediate_size * 3) * bc  # one layer's prefill temps
    cands = []
    counts = sorted({1, *[k for k in (2, 4, 8) if k <= job.total_gpus], job.total_gpus})
    for n in counts:
        layers = [t.num_layers // n + (1 if i < t.num_layers % n else 0) for i in range(n)]
        per_gpu = []
        for i, L in enumerate(layers):
            w = L * decoder_bytes_per_layer + (first_bytes if i == 0 else 0) + (last_bytes if i == n - 1 else 0)
            kv = L * kv_per_layer
            alloc = w + kv + prefill + (logits if i == n - 1 else 0)
            per_gpu.append((w, kv, alloc))
        w, kv, alloc = max(per_gpu, key=lambda x: x[2])
        smi = int(alloc * ALLOCATOR_RESERVE_FACTOR) + CUDA_CONTEXT_BYTES
        usable = hw.memory_bytes * (1 - job.headroom)
        reasons = [] if smi <= usable else [f"needs {gib(smi)} on the fullest GPU > {gib(usable)} usable"]
        total_w = sum(x[0] for x in per_gpu)
        bw = hw.hbm_bandwidth_gbps * 1e9 * HBM_EFFICIENCY
        step_s = (total_w + sum(x[1] for x in per_gpu)) / bw if bw else float("inf")  # layers run one GPU at a time
        cands.append({
            "zero_stage": 0, "offload": "none", "gpus": n, "nodes": 1, "micro_batch": o.batch, "grad_accum": 1,
            "global_batch": o.batch, "grad_checkpointing": False, "fits": not reasons, "compatible": True,
            "reasons": reasons, "notes": [] if n == job.total_gpus else [f"leaves {job.total_gpus - n} GPUs idle"],
            "vram_per_gpu_bytes": smi, "vram_allocated_per_gpu_bytes": int(alloc),
            "vram_breakdown": {"weights": int(w), "kv_cache": int(kv), "prefill_transient": int(prefill),
                               "cuda_context": CUDA_CONTEXT_BYTES},
            "vram_formulas": {"weights": "layers on this GPU x bytes per layer (+ embeddings/vision on GPU 0, lm_head last)",
                              "kv_cache": "2 x layers x kv_dim x 2 B x context x batch",
                              "prefill_transient": "one layer's prefill temporaries", "cuda_context": "constant"},
            "peak_phase": "prefill", "cpu_ram_bytes": 0, "cpu_breakdown": {}, "pinned_cpu_bytes": 0,
            "disk_bytes": 0 if job.base_weights_on_disk else (m.stored_total_bytes or c.total * 2),
            "disk_breakdown": {"base_weights": 0 if job.base_weights_on_disk else (m.stored_total_bytes or c.total * 2)},
            "checkpoint_bytes": 0, "checkpoint_breakdown": {},
            "time_seconds": step_s * 256,
            "time_detail": {"decode_tokens_per_s": o.batch / step_s if step_s else 0.0,
                            "what": "seconds to decode 256 tokens (memory-bound)"},
            "ds_config": None,
        })
    fitting = [i for i, c_ in enumerate(cands) if c_["fits"]]
    pick = min(fitting, key=lambda i: (cands[i]["gpus"], cands[i]["time_seconds"])) if fitting else None
    return {"task": "infer", "model": {"name": m.name, "path": m.path, "params": c.total, "trainable_params": 0,
                                       "image_tokens": m.image_tokens},
            "recipe": recipe_dict(r_inf), "hardware": ctx["selection"], "gpus_source": ctx["gpus_source"],
            "quant": job.quant, "compute_dtype": job.compute_dtype, "context": o.context, "batch": o.batch,
            "headroom": job.headroom, "assumptions": ctx["assumptions"], "candidates": cands, "pick": pick,
            "why_not_faster": []}
