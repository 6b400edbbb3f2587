"""`--task infer`: weights + vision tower + KV cache, split over GPUs the way device_map="auto" does
(docs/estimate.md#inference).

accelerate's infer_auto_device_map (accelerate/utils/modeling.py) fills GPUs in module order (embeddings,
vision tower and projector first, then decoder layers, lm_head last), keeping whole decoder layers on one
device. KV cache (EleutherAI, Transformer Math 101): 2 (K and V) x layers x kv_heads x d_head x bytes x
tokens x batch. Decoding is memory-bound: one token per sequence reads every weight once, so
tokens/s ~ batch x HBM bandwidth x efficiency / bytes read per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vramplan.estimate.families import module_for
from vramplan.estimate.param_groups import param_groups
from vramplan.estimate.params import count_params
from vramplan.estimate.priors import ALLOCATOR_RESERVE_FACTOR, CUDA_CONTEXT_BYTES, HBM_EFFICIENCY
from vramplan.estimate.types import Candidate, Job, Offload, Strategy
from vramplan.units import gib

DECODE_TOKENS = 256  # the time figure: seconds to decode this many tokens


@dataclass(frozen=True)
class _Layout:
    """Bytes that device_map="auto" places, per part."""

    decoder_layer: int  # weights of one decoder layer
    first: int  # embeddings, vision tower, projector (the first GPU)
    last: int  # lm_head + final norm (the last GPU)
    kv_per_layer: int
    logits: int
    prefill: int


def inference_recipe(recipe):
    """Inference never trains: no adapters, no trained projector; the quantization choice stays."""
    return replace(recipe, llm_lora=None, vision_lora=None, train_projector=False, train_llm_full=False)


def _layout(job: Job, context: int, batch: int) -> _Layout:
    m, bc = job.model, 2
    t, text = m.text, module_for(m.text)
    g = param_groups(m, inference_recipe(job.recipe))
    c = count_params(m)
    bytes_per_linear_param = (g.quantized_bytes / max(1, g.quantized_params)) if g.quantized_params else bc
    return _Layout(
        decoder_layer=int((c.llm_linear / t.num_layers) * bytes_per_linear_param + (c.llm_norms / t.num_layers) * bc),
        first=(c.llm_embed + c.vision_total + c.projector) * bc,
        last=(c.llm_lm_head + t.hidden_size) * bc,
        kv_per_layer=text.kv_bytes_per_token(t, bc) * context * batch,
        logits=batch * t.vocab_size * 4,  # last-token logits (generate keeps 1 position), fp32
        prefill=batch * context * text.prefill_bytes_per_token(t, bc),
    )


def _candidate(job: Job, lay: _Layout, n: int, batch: int) -> Candidate:
    layers_total = job.model.text.num_layers
    layers = [layers_total // n + (1 if i < layers_total % n else 0) for i in range(n)]
    per_gpu = []
    for i, L in enumerate(layers):
        w = L * lay.decoder_layer + (lay.first if i == 0 else 0) + (lay.last if i == n - 1 else 0)
        kv = L * lay.kv_per_layer
        per_gpu.append((w, kv, w + kv + lay.prefill + (lay.logits if i == n - 1 else 0)))
    w, kv, alloc = max(per_gpu, key=lambda x: x[2])
    smi = int(alloc * ALLOCATOR_RESERVE_FACTOR) + CUDA_CONTEXT_BYTES
    usable = job.hardware.memory_bytes * (1 - job.headroom)
    reasons = [] if smi <= usable else [f"needs {gib(smi)} on the fullest GPU > {gib(usable)} usable"]
    bw = job.hardware.hbm_bandwidth_gbps * 1e9 * HBM_EFFICIENCY
    step_s = sum(x[0] + x[1] for x in per_gpu) / bw if bw else float("inf")  # layers run one GPU at a time
    m = job.model
    weights_on_disk = 0 if job.base_weights_on_disk else (m.stored_total_bytes or count_params(m).total * 2)
    return Candidate(
        strategy=Strategy(0, Offload.NONE, n, 1, batch, 1, False), fits=not reasons, reasons=reasons,
        notes=[] if n == job.total_gpus else [f"leaves {job.total_gpus - n} GPUs idle"],
        vram_per_gpu_bytes=smi, vram_allocated_per_gpu_bytes=int(alloc),
        vram_breakdown={"weights": int(w), "kv_cache": int(kv), "prefill_transient": int(lay.prefill),
                        "cuda_context": CUDA_CONTEXT_BYTES},
        vram_formulas={"weights": "layers on this GPU x bytes per layer (+ embeddings/vision on GPU 0, lm_head last)",
                       "kv_cache": "2 x layers x kv_dim x 2 B x context x batch",
                       "prefill_transient": "one layer's prefill temporaries", "cuda_context": "constant"},
        peak_phase="prefill", cpu_ram_bytes=0, cpu_breakdown={}, pinned_bytes=0,
        disk_bytes=weights_on_disk, disk_breakdown={"base_weights": weights_on_disk},
        checkpoint_bytes=0, checkpoint_breakdown={}, time_seconds=step_s * DECODE_TOKENS,
        time_detail={"decode_tokens_per_s": batch / step_s if step_s else 0.0,
                     "what": f"seconds to decode {DECODE_TOKENS} tokens (memory-bound)"},
        ds_config=None)


def infer_candidates(job: Job, context: int, batch: int) -> tuple[list[Candidate], int | None]:
    """One candidate per GPU count (1, 2, 4, 8 and all), and the pick: the fewest GPUs that fit."""
    lay = _layout(job, context, batch)
    counts = sorted({1, *[k for k in (2, 4, 8) if k <= job.total_gpus], job.total_gpus})
    cands = [_candidate(job, lay, n, batch) for n in counts]
    fitting = [i for i, c in enumerate(cands) if c.fits]
    pick = min(fitting, key=lambda i: (cands[i].strategy.gpus, cands[i].time_seconds)) if fitting else None
    return cands, pick
