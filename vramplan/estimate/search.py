"""Enumerate every ZeRO stage x offload x GPU count x micro-batch x checkpointing candidate,
estimate each and mark what fits. The pick among them is vramplan/estimate/policy.py."""

from __future__ import annotations

from vramplan.estimate.activations import activation_bytes
from vramplan.estimate.ds_config import buckets_for, make_ds_config
from vramplan.estimate.families import module_for
from vramplan.estimate.gpu_memory import GpuMemory, gpu_memory
from vramplan.estimate.host import HostNeeds, host_needs, trainer_steps
from vramplan.estimate.optimizers import DEEPSPEED, TORCH, TRAINABLE_DTYPES, mean_trainable_bytes
from vramplan.estimate.param_groups import ParamGroups, param_groups
from vramplan.estimate.timing import TimeEstimate, estimate_time, time_detail
from vramplan.estimate.types import Candidate, Job, Offload, Quant, Strategy, offloads_optimizer
from vramplan.units import gib

# the known failure: bitsandbytes-foundation/bitsandbytes#1179, huggingface/peft#2014; the fix: PEFT
# docs/source/accelerate/deepspeed.md
ZERO3_4BIT_NOTE = ("ZeRO-3 with 4-bit weights is known to fail with \"All input tensors need to be on the same GPU\" "
                   "unless bnb_4bit_quant_storage = the compute dtype (set in this plan) and bitsandbytes>=0.43.3, "
                   "accelerate>=1.0.1, transformers>4.44.2, peft>0.13.0 (PEFT DeepSpeed docs); "
                   "`vramplan preflight` checks the versions")


def gpu_counts_for(job: Job) -> list[int]:
    """1, 2, 4, ... GPUs of one node, then 2, 4, ... whole nodes, and all of them."""
    g = job.gpus_per_node
    counts = {g}
    k = 1
    while k < g:
        counts.add(k)
        k *= 2
    n = 2
    while n <= job.nodes:
        counts.add(n * g)
        n *= 2
    counts.add(job.total_gpus)
    return sorted(counts)


def _micro_batches(job: Job, gpus: int) -> list[int]:
    if job.micro_batches:
        return list(job.micro_batches)
    gb = job.recipe.global_batch
    out, m = [], 1
    while m <= max(1, gb // gpus) and m <= 64:
        out.append(m)
        m *= 2
    return out or [1]


def _grad_accum(job: Job, micro: int, gpus: int) -> int:
    if job.grad_accum is not None:
        return job.grad_accum
    return max(1, -(-job.recipe.global_batch // (micro * gpus)))


def incompatibility(job: Job, s: Strategy) -> str | None:
    if job.device == "cpu" and (s.zero_stage or s.offload != Offload.NONE or s.engine != TORCH):
        return "CPU runs use plain PyTorch (no DeepSpeed ZeRO)"
    if s.engine == TORCH and (s.zero_stage or s.offload != Offload.NONE):
        return "plain PyTorch has no ZeRO partitioning or offload"
    if offloads_optimizer(s.offload) and job.recipe.optimizer != "adamw_torch":
        return (f"offload_optimizer steps with DeepSpeedCPUAdam (fp32 states); {job.recipe.optimizer} "
                "cannot be offloaded: use --offload none or --optimizer adamw_torch")
    if s.offload != Offload.NONE and s.zero_stage == 0:
        return "optimizer offload needs ZeRO stage >= 1"
    if s.offload == Offload.PARAMS and s.zero_stage != 3:
        return "parameter offload needs ZeRO-3"
    if job.attn == "flash" and job.device != "cuda":
        return "FlashAttention-2 (--attn flash) runs on CUDA GPUs only"
    if job.quant == Quant.INT8 and s.zero_stage == 3:
        return "8-bit (LLM.int8) weights cannot be partitioned by ZeRO-3; use ZeRO-2 or NF4 with quant storage"
    return None


def autocast_upcast(job: Job, groups: ParamGroups, s: Strategy) -> dict:
    """What plain PyTorch under autocast adds (vramplan/estimate/activations.py, docs/estimate.md#activations):
    with k-bit weights peft's prepare_model_for_kbit_training leaves every non-quantized weight fp32 and no
    engine casts the module back (DeepSpeed does: runtime/engine.py module.bfloat16()), so the residual stream
    is fp32 and the frozen lm_head is cast per forward; fp32 trainable weights get autocast's cached copies.
    All of it is the mixed-precision setup (trainable_dtype fp32); "pure bf16" (trainable_dtype bf16: LitGPT
    bf16-true, torchtune) keeps the whole model in 16 bit (vramplan/estimate/optimizers.py)."""
    r, bc = job.recipe, job.compute_bytes
    if s.engine != TORCH or bc >= 4 or TRAINABLE_DTYPES[r.trainable_dtype] <= bc:
        return {}
    kbit = job.quant in Quant.KBIT and not r.train_llm_full
    # embed_tokens is no autocast op: its trained copy (modules_to_save) is not cast
    cast = groups.trainable - (job.model.text.vocab_size * job.model.text.hidden_size
                               if "embed_tokens" in r.modules_to_save else 0)
    if r.trainable_dtype == "peft" and not kbit:  # only the fp32 adapters are cast; the copies are 16-bit
        cast = groups.trainable_llm_lora + groups.trainable_vision_lora
    # a bf16 lm_head (--kbit-embed-dtype bf16) needs no per-forward cast copy
    return dict(residual_bytes=4 if kbit else 0, cast_params=cast,
                llm_cast_params=groups.trainable_llm_lora if cast else 0,
                head_cast=kbit and "lm_head" not in r.modules_to_save and r.kbit_embed_dtype == "fp32")


def _memory(job: Job, groups: ParamGroups, s: Strategy) -> GpuMemory:
    r, bc = job.recipe, job.compute_bytes
    llm_mode = "full" if r.train_llm_full else ("lora" if r.llm_lora else "frozen")
    traced = module_for(job.model.text) if job.model.text.family == "traced" else None
    if traced:  # measured, not derived (families/traced.py)
        act = traced.traced_activations(job.model.text, s.micro_batch, s.grad_ckpt, s.engine)
    else:
        act = activation_bytes(job.model.text, job.model.vision, micro_batch=s.micro_batch, seq=job.seq_len,
                               images_per_sample=job.images_per_sample, llm_mode=llm_mode, llm_lora=r.llm_lora,
                               vision_lora=r.vision_lora, grad_ckpt=s.grad_ckpt, attn=job.attn, compute_bytes=bc,
                               projector=job.model.projector, projector_trained=r.train_projector,
                               kbit_saves_inputs=job.kbit_saves_inputs and job.quant == Quant.NF4,
                               tower_tokens=job.model.tower_tokens, projector_tokens=job.model.projector_tokens,
                               padded=(s.micro_batch > 1 and job.padded_batches) or _mask_in_training(job),
                               **autocast_upcast(job, groups, s))
    buckets = buckets_for(job.model.text.hidden_size, groups.trainable, job.ds_buckets)
    load_b = 4 if job.quant in Quant.KBIT else bc  # prepare_model_for_kbit_training upcasts to fp32
    mem = gpu_memory(groups, act, s, buckets, compute_bytes=bc, quant=job.quant, device=job.device,
                     load_bytes_per_param=load_b, optimizer=r.optimizer,
                     trainable_bytes=_trainable_bytes(job, groups), largest_trainable=_largest_trainable(job, groups),
                     frozen_16bit=_embeddings_cast_back(job, s))
    if traced:  # docs/estimate.md#the-traced-path
        mem.components = traced.relabel(mem.components, job.model.text)
    return mem


def _embeddings_cast_back(job: Job, s: Strategy) -> int:
    """Frozen weights a k-bit plain-PyTorch run casts back to 16 bit after prepare_model_for_kbit_training's fp32
    upcast (--kbit-embed-dtype bf16): the input embeddings and the lm_head, as TRL's SFTTrainer does under bf16
    (trl trainer/utils.py peft_module_casting_to_bf16: modules named embed_tokens/lm_head/wte/wpe; norms stay
    fp32) and artidoro/qlora's qlora.py before it. peft's modules_to_save keeps the original frozen beside the copy."""
    t = job.model.text
    if s.engine != TORCH or job.quant not in Quant.KBIT or job.recipe.kbit_embed_dtype != "bf16":
        return 0
    return t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)


def _mask_in_training(job: Job) -> bool:
    """A wrapper whose training step always gives the decoder an explicit mask (families/paligemma.py, gemma3.py)."""
    p = job.model.projector
    return p is not None and getattr(module_for(p), "MASK_IN_TRAINING", False)


def _trainable_bytes(job: Job, g: ParamGroups) -> float:
    # with k-bit weights prepare_model_for_kbit_training has upcast the originals before peft copies them: fp32
    copies = 4 if job.quant in Quant.KBIT and not job.recipe.train_llm_full else job.compute_bytes
    return mean_trainable_bytes(job.recipe.trainable_dtype, g.trainable, g.trainable_llm_lora + g.trainable_vision_lora,
                                copies)


def _largest_trainable(job: Job, g: ParamGroups) -> int:
    """Elements of the largest trainable tensor (what the ZeRO-3 export gathers at once): the embedding or
    lm_head when trained in full, else at most the largest Linear (a LoRA factor or projector is smaller)."""
    t = job.model.text
    if job.recipe.train_llm_full or job.recipe.modules_to_save:
        return max(t.vocab_size * t.hidden_size, g.largest_linear_elems)
    return g.largest_linear_elems if g.trainable else 0


def _host(job: Job, groups: ParamGroups, s: Strategy) -> HostNeeds:
    weights_source = "measured" if job.base_weights_on_disk else (
        "assumed" if job.model.stored_total_bytes else "computed")
    return host_needs(groups, s, compute_bytes=job.compute_bytes, deepspeed=s.engine != TORCH,
                      optimizer=job.recipe.optimizer, trainable_bytes=_trainable_bytes(job, groups),
                      base_weights_bytes=job.model.stored_total_bytes or groups.total_params * 2,
                      base_weights_on_disk=job.base_weights_on_disk, dataset_bytes=job.dataset_bytes,
                      keep_checkpoints=job.recipe.keep_checkpoints, workers=job.workers, device=job.device,
                      dataset_on_disk=job.dataset_on_disk, dataset_source=job.dataset_source,
                      weights_source=weights_source, steps=trainer_steps(job.samples, job.epochs, s.global_batch),
                      save_steps=job.recipe.save_steps)


def _time(job: Job, groups: ParamGroups, s: Strategy) -> TimeEstimate:
    return estimate_time(job.model, job.hardware, groups, s, seq=job.mean_seq_len or job.seq_len,
                         images=job.images_per_sample, samples=job.samples, epochs=job.epochs, quant=job.quant,
                         compute_dtype=job.compute_dtype, vision_trainable=bool(job.recipe.vision_lora),
                         device=job.device, lora=job.recipe.llm_lora, host_cores=job.cpu_cores)


def _reasons(job: Job, s: Strategy, vram_smi: int, cpu_ram: int, disk: int) -> list[str]:
    """Why the candidate does not fit (empty: it fits)."""
    reasons = []
    compat = incompatibility(job, s)
    if compat:
        reasons.append(compat)
    usable = job.hardware.memory_bytes * (1 - job.headroom)
    if vram_smi > usable:
        reasons.append(
            f"needs {gib(vram_smi)} per GPU > {gib(usable)} usable "
            f"({job.hardware.display_name} {gib(job.hardware.memory_bytes)} minus {job.headroom:.0%} headroom)"
        )
    if job.cpu_ram_bytes is not None and cpu_ram > job.cpu_ram_bytes:
        reasons.append(f"needs {gib(cpu_ram)} CPU RAM per node > {gib(job.cpu_ram_bytes)} available")
    if job.disk_free_bytes is not None and disk > job.disk_free_bytes:
        reasons.append(f"needs {gib(disk)} disk > {gib(job.disk_free_bytes)} free")
    return reasons


def _notes(job: Job, s: Strategy, calibration: dict) -> list[str]:
    notes = []
    if calibration:
        notes.append("calibrated: " + ", ".join(f"{k} x{v:.2f}" for k, v in sorted(calibration.items())))
    if s.gpus < job.total_gpus:
        notes.append(f"leaves {job.total_gpus - s.gpus} of {job.total_gpus} GPUs idle")
    if s.zero_stage == 3 and job.quant == Quant.NF4:
        notes.append(ZERO3_4BIT_NOTE)
    if job.grad_accum is None and s.global_batch != job.recipe.global_batch:
        notes.append(f"global batch {s.global_batch} (recipe {job.recipe.global_batch} is not "
                     f"divisible by micro-batch x GPUs)")
    return notes


def evaluate(job: Job, groups: ParamGroups, s: Strategy) -> Candidate:
    """Every estimate of one strategy, with calibration factors applied when given (never silently)."""
    mem, host, t = _memory(job, groups, s), _host(job, groups, s), _time(job, groups, s)
    cal = dict(job.calibration)
    vram_alloc = int(mem.peak_allocated * cal.get("vram_allocated", 1.0))
    vram_smi = int(mem.nvidia_smi * cal.get("vram_reserved", cal.get("vram_allocated", 1.0)))
    cpu_ram = int(host.cpu_ram_bytes * cal.get("cpu_ram", 1.0))
    ckpt = int(host.checkpoint_bytes * cal.get("checkpoint", 1.0))
    disk = int(host.disk_bytes + (ckpt - host.checkpoint_bytes) * host.checkpoints_on_disk)
    reasons = _reasons(job, s, vram_smi, cpu_ram, disk)
    margin = int(job.hardware.memory_bytes * (1 - job.headroom)) - vram_smi
    ds = None
    if s.engine != TORCH:
        buckets = buckets_for(job.model.text.hidden_size, groups.trainable, job.ds_buckets)
        ds = make_ds_config(s, buckets, compute_dtype=job.compute_dtype, hidden_size=job.model.text.hidden_size,
                            optimizer=job.recipe.optimizer)
    return Candidate(
        strategy=s, fits=not reasons, reasons=reasons, notes=_notes(job, s, cal),
        vram_per_gpu_bytes=vram_smi, vram_allocated_per_gpu_bytes=vram_alloc,
        vram_breakdown=mem.as_dict(), vram_formulas={c.name: f"{c.formula} [{c.source}]" for c in mem.components},
        peak_phase=mem.peak_phase, cpu_ram_bytes=cpu_ram, cpu_breakdown=host.cpu_breakdown,
        pinned_bytes=host.pinned_bytes, disk_bytes=disk, disk_breakdown=host.disk_breakdown,
        checkpoint_bytes=ckpt, checkpoint_breakdown=host.checkpoint_breakdown,
        time_seconds=t.seconds * cal.get("time_per_step", 1.0),
        time_detail=time_detail(t, t.seconds * cal.get("time_per_step", 1.0), cal),
        ds_config=ds, compatible=incompatibility(job, s) is None, disk_sources=host.disk_sources,
        disk_present=host.disk_present, checkpoint_saves=host.checkpoint_saves,
        checkpoints_on_disk=host.checkpoints_on_disk,
        margin_bytes=margin, margin_fraction=margin / job.hardware.memory_bytes)


def _layouts(job: Job) -> list[tuple[str, int]]:
    """(engine, ZeRO stage) pairs to sweep: DeepSpeed ZeRO 0-3, and plain PyTorch (shown as stage 0).
    A CPU device runs plain PyTorch only."""
    out = []
    if TORCH in job.engines and 0 in job.zero_stages:
        out.append((TORCH, 0))
    if job.device != "cpu" and DEEPSPEED in job.engines:
        out += [(DEEPSPEED, z) for z in job.zero_stages]
    return out


def sweep(job: Job) -> list[Candidate]:
    groups = param_groups(job.model, job.recipe)
    out = []
    for gpus in gpu_counts_for(job):
        nodes = max(1, -(-gpus // job.gpus_per_node))
        for engine, z in _layouts(job):
            for off in Offload.BY_STAGE[z] if engine == DEEPSPEED else (Offload.NONE,):
                if off not in job.offloads:
                    continue
                for gc in job.grad_ckpt:
                    for mb in _micro_batches(job, gpus):
                        s = Strategy(z, off, gpus, nodes, mb, _grad_accum(job, mb, gpus), gc, engine)
                        out.append(evaluate(job, groups, s))
    return out


STAGE_PREFERENCE = {2: 0, 1: 1, 0: 2, 3: 3}  # on ties: ZeRO-2 is the path XTuner/LLaVA use with (Q)LoRA;
#   ZeRO-3 last (4-bit sharding needs quant-storage care; extra gather overhead)


def rank_key(c: Candidate):
    """Time order, fastest first; ties: fewer GPUs, less offload, preferred stage, larger micro-batch, no ckpt."""
    s = c.strategy
    return (round(c.time_seconds, 3), s.gpus, Offload.ALL.index(s.offload),
            STAGE_PREFERENCE[s.zero_stage], s.engine == TORCH, -s.micro_batch, s.grad_ckpt)
