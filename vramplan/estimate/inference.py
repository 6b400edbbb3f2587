"""`--task infer`: weights + vision tower + KV cache, split over GPUs the way device_map="auto" does,
for each weight dtype: the stored one, LLM.int8 and NF4 (docs/estimate.md#inference).

accelerate's infer_auto_device_map (accelerate/utils/modeling.py) fills GPUs in module order (embeddings,
vision tower and projector first, then decoder layers, lm_head last), keeping whole decoder layers on one
device. KV cache (EleutherAI, Transformer Math 101): 2 (K and V) x layers x kv_heads x d_head x bytes x
tokens x batch. Time: prefill + decode steps, each from inference_time.py (weights / bandwidth, attention
over the context, per-layer host ops).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vramplan.estimate.families import module_for
from vramplan.estimate.inference_time import decode_terms, prefill_seconds
from vramplan.estimate.param_groups import param_groups
from vramplan.estimate.params import count_params, decoder_layer_params
from vramplan.estimate.priors import ALLOCATOR_RESERVE_FACTOR, CUDA_CONTEXT_BYTES
from vramplan.estimate.timing_band import band
from vramplan.estimate.types import COMPUTE_BYTES, Candidate, Job, Offload, Quant, Strategy
from vramplan.units import gib

DECODE_TOKENS = 256  # the time figure: seconds to decode this many tokens
PRECISION = ("fp32", "bf16", "fp16", Quant.INT8, Quant.NF4)  # most precise first


@dataclass(frozen=True)
class _Layout:
    """Bytes that device_map="auto" places, per part, for one weight dtype."""

    decoder_layer: int  # weights of one decoder layer
    first: int  # embeddings, vision tower, projector (the first GPU)
    last: int  # lm_head + final norm (the last GPU), and what integer division left over
    kv_per_layer: int
    logits: int
    prefill: int
    act_bytes: int  # bytes per element of activations and the KV cache


def inference_recipe(recipe):
    """Inference never trains: no adapters, no trained projector; the quantization choice stays."""
    return replace(recipe, llm_lora=None, vision_lora=None, train_projector=False, train_llm_full=False)


def infer_dtypes(job: Job, quant: str | None) -> tuple[list[str], list[str]]:
    """(weight dtypes to estimate, most precise first; notes for the output).

    The stored dtype (as from_pretrained(torch_dtype="auto") loads it; fp16 where the device has no bf16),
    plus the 16-bit compute dtype when the model is stored in fp32, then LLM.int8 and NF4 where
    bitsandbytes has kernels. `quant` (--quant) narrows: "none" = the unquantized rows, "int8"/"nf4" = that one.
    """
    notes = []
    stored = job.model.stored_dtype if job.model.stored_dtype in COMPUTE_BYTES else "bf16"
    if stored == "bf16" and job.compute_dtype == "fp16":
        notes.append(f"{job.hardware.display_name} has no bf16: the bf16 weights load as fp16 (same bytes)")
        stored = "fp16"
    floats = [stored] + ([job.compute_dtype] if stored == "fp32" and job.compute_dtype != "fp32" else [])
    kbit = list(Quant.KBIT) if job.hardware.bnb_4bit_supported else []
    if not kbit:
        notes.append(f"bitsandbytes has no int8/nf4 kernels on {job.hardware.display_name}: "
                     f"only {'/'.join(floats)} weights are estimated")
    dtypes = floats + kbit
    if quant == Quant.NONE:
        dtypes = floats
    elif quant in Quant.KBIT:
        dtypes = [quant] if quant in kbit else floats
    return sorted(dtypes, key=PRECISION.index), notes


def act_dtype(job: Job, dtype: str) -> str:
    """Activations and KV cache: the weights' dtype for unquantized weights, else the 16-bit compute dtype
    (bitsandbytes keeps the non-quantized modules and computes in it)."""
    return dtype if dtype in COMPUTE_BYTES else job.compute_dtype


def weight_bytes(job: Job, dtype: str) -> int:
    """Every weight of the model stored in `dtype`: param_groups' exact k-bit storage for the LLM's Linear
    weights, the rest (embeddings, lm_head, norms, biases, vision tower, projector) in the compute dtype."""
    bc = COMPUTE_BYTES[act_dtype(job, dtype)]
    if dtype in COMPUTE_BYTES:
        return count_params(job.model).total * bc
    g = param_groups(job.model, replace(inference_recipe(job.recipe), quant=dtype))
    return g.quantized_bytes + (g.total_params - g.quantized_params) * bc


def _layout(job: Job, dtype: str, context: int, batch: int, prompt: int | None = None) -> _Layout:
    m = job.model
    t, text = m.text, module_for(m.text)
    bc = COMPUTE_BYTES[act_dtype(job, dtype)]
    c = count_params(m)
    layer = decoder_layer_params(m) * bc
    if dtype in Quant.KBIT:
        g = param_groups(m, replace(inference_recipe(job.recipe), quant=dtype))
        # every quantized Linear is in a decoder layer, the same in each layer
        layer = g.quantized_bytes // t.num_layers + (decoder_layer_params(m) - g.quantized_params // t.num_layers) * bc
    first = (c.llm_embed + c.vision_total + c.projector) * bc
    return _Layout(
        decoder_layer=layer, first=first, last=weight_bytes(job, dtype) - first - t.num_layers * layer,
        kv_per_layer=round(text.kv_bytes_per_token(t, bc) * text.kv_cache_tokens(t, context) * batch),
        logits=batch * t.vocab_size * 4,  # last-token logits (generate keeps 1 position), fp32
        # the prompt is prefilled at once; generated tokens pass one at a time (transformers generate)
        prefill=batch * (prompt or context) * text.prefill_bytes_per_token(t, bc), act_bytes=bc,
    )


def _unread_expert_bytes(job: Job, dtype: str, batch: int) -> float:
    """A mixture of experts' weights a decode step does not read: the experts no token of the step is routed
    to (families/mixtral.py unread_params, uniform routing assumed), at their storage's bytes per weight."""
    t = job.model.text
    fam = module_for(t)
    if not hasattr(fam, "unread_params"):
        return 0.0
    per = COMPUTE_BYTES[act_dtype(job, dtype)]
    if dtype in Quant.KBIT and not t.fused_experts:  # transformers 4.x: the experts are quantized Linears
        g = param_groups(job.model, replace(inference_recipe(job.recipe), quant=dtype))
        per = g.quantized_bytes / max(1, g.quantized_params)
    return fam.unread_params(t, batch) * per


def _candidate(job: Job, dtype: str, lay: _Layout, n: int, batch: int, context: int) -> Candidate:
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
    read = sum(x[0] for x in per_gpu) - _unread_expert_bytes(job, dtype, batch)
    terms = decode_terms(job.model, job.hardware, weight_bytes=read, context=context,
                         batch=batch, act_bytes=lay.act_bytes, kernel="bnb" if dtype in Quant.KBIT else "")
    step_s = sum(terms.values())  # layers run one GPU at a time
    prefill_s = prefill_seconds(job.model, job.hardware, context=context, batch=batch,
                                compute_dtype=act_dtype(job, dtype))
    seconds = prefill_s + step_s * DECODE_TOKENS
    m = job.model
    weights_on_disk = 0 if job.base_weights_on_disk else (m.stored_total_bytes or count_params(m).total * 2)
    wb = {Quant.NF4: "NF4 Linear weights + quant state", Quant.INT8: "int8 Linear weights + fp32 row scales"}
    return Candidate(
        strategy=Strategy(0, Offload.NONE, n, 1, batch, 1, False), fits=not reasons, reasons=reasons,
        notes=[] if n == job.total_gpus else [f"leaves {job.total_gpus - n} GPUs idle"],
        vram_per_gpu_bytes=smi, vram_allocated_per_gpu_bytes=int(alloc),
        vram_breakdown={"weights": int(w), "kv_cache": int(kv), "prefill_transient": int(lay.prefill),
                        "cuda_context": CUDA_CONTEXT_BYTES},
        vram_formulas={"weights": f"layers on this GPU x bytes per layer ({wb.get(dtype, dtype)}; the rest in "
                                  f"{lay.act_bytes} B) + embeddings/vision on GPU 0, lm_head last",
                       "kv_cache": f"2 x layers x kv_dim x {lay.act_bytes} B x context x batch",
                       "prefill_transient": "one layer's prefill temporaries", "cuda_context": "constant"},
        peak_phase="prefill", cpu_ram_bytes=0, cpu_breakdown={}, pinned_bytes=0,
        disk_bytes=weights_on_disk, disk_breakdown={"base_weights": weights_on_disk},
        checkpoint_bytes=0, checkpoint_breakdown={}, time_seconds=seconds,
        time_detail={"decode_tokens_per_s": batch / step_s if step_s else 0.0, "prefill_s": prefill_s,
                     "decode_terms_s_per_token": terms, "band": band(seconds, "decode"),
                     "what": f"seconds to prefill the context and decode {DECODE_TOKENS} tokens"},
        ds_config=None, dtype=dtype,
        vram_total_bytes=sum(int(a * ALLOCATOR_RESERVE_FACTOR) + CUDA_CONTEXT_BYTES for _, _, a in per_gpu))


def _gpus(n: int) -> str:
    return f"{n} GPU" + ("s" if n > 1 else "")


def pick_dtype(job: Job, cands: list[Candidate], dtypes: list[str]) -> tuple[int | None, str]:
    """The most precise dtype that fits, on the fewest GPUs for it; and why, in one line."""
    usable = job.hardware.memory_bytes * (1 - job.headroom)
    said = []
    for d in dtypes:
        rows = [i for i, c in enumerate(cands) if c.dtype == d]
        fit = [i for i in rows if cands[i].fits]
        if not fit:
            c = cands[min(rows, key=lambda i: cands[i].vram_per_gpu_bytes)]
            said.append(f"{d} does not fit on {_gpus(c.strategy.gpus)} (needs {gib(c.vram_per_gpu_bytes)} "
                        f"> {gib(usable)} usable)")
            continue
        best = min(fit, key=lambda i: (cands[i].strategy.gpus, cands[i].time_seconds))
        c = cands[best]
        fewer = [cands[i] for i in rows if cands[i].strategy.gpus < c.strategy.gpus]
        s = f"{d} fits on {_gpus(c.strategy.gpus)} ({gib(c.vram_per_gpu_bytes)} of {gib(usable)} usable per GPU"
        if fewer:
            f = max(fewer, key=lambda x: x.strategy.gpus)
            s += f"; {_gpus(f.strategy.gpus)} would need {gib(f.vram_per_gpu_bytes)}"
        said.append(s + ")")
        return best, "; ".join(said) + ": the most precise dtype that fits, on the fewest GPUs"
    return None, "nothing fits: " + "; ".join(said)


def infer_candidates(job: Job, context: int, batch: int, dtypes: list[str],
                     prompt: int | None = None) -> tuple[list[Candidate], int | None, str]:
    """For each dtype (most precise first), one candidate per GPU count (1, 2, 4, 8 and all); the pick
    (an index into the candidates, or None) and the reason for it. `prompt`: tokens prefilled at once (default
    the whole context); the KV cache holds the whole context either way."""
    counts = sorted({1, *[k for k in (2, 4, 8) if k <= job.total_gpus], job.total_gpus})
    cands = []
    for d in dtypes:
        lay = _layout(job, d, context, batch, prompt)
        cands += [_candidate(job, d, lay, n, batch, context) for n in counts]
    best, reason = pick_dtype(job, cands, dtypes)
    return cands, best, reason
