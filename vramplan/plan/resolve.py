"""Resolve an EstimateOptions into a planner Job: model, recipe overrides, hardware, data, host facts."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.plan.request import DEFAULT_MODEL, EstimateOptions

def _apply_overrides(recipe, o: EstimateOptions, model):
    changes = {}
    if o.quant is not None:
        changes["quant"] = o.quant
    if o.lora_r is not None:
        if recipe.llm_lora is None:
            raise UsageError(f"--lora-r: recipe {recipe.name!r} trains no LLM LoRA", "use --recipe qlora or lora")
        changes["llm_lora"] = replace(recipe.llm_lora, r=o.lora_r)
    if o.epochs is not None:
        changes["epochs"] = o.epochs
    if o.save_steps is not None:
        changes["save_steps"] = o.save_steps
    if o.keep_checkpoints is not None:
        changes["keep_checkpoints"] = o.keep_checkpoints
    if o.global_batch is not None:
        changes["global_batch"] = o.global_batch
    if o.seq_len is not None:
        if model.vision is not None and o.seq_len <= model.image_tokens:
            raise UsageError(f"--seq-len: {o.seq_len} leaves no room for text after {model.image_tokens} image tokens",
                             f"use --seq-len > {model.image_tokens}")
        changes["max_length"] = o.seq_len
    return replace(recipe, **changes) if changes else recipe


def build_job(o: EstimateOptions):
    """Resolve names, files and this host's facts into a planner Job. Returns (job, context dict)."""
    from vramplan.inputs import gpus as gpus_mod
    from vramplan.inputs.model_dir import resolve_model
    from vramplan.estimate.search import Job
    from vramplan.inputs.profiles import load_recipe
    from vramplan.units import parse_size

    ctx: dict = {"assumptions": [], "host": {}}
    model = resolve_model(o.model or DEFAULT_MODEL)
    recipe = _apply_overrides(load_recipe(o.recipe), o, model)

    if o.gpus:
        sel = gpus_mod.parse_gpus(o.gpus)
        ctx["gpus_source"] = "--gpus"
    elif o.device == "cpu":
        sel = cpu_host_selection()
        ctx["gpus_source"] = "this host's CPU (--device cpu)"
    else:
        sel = gpus_mod.detect_local_gpus()
        if sel is None:
            raise UsageError("no GPU or NPU detected on this host (NVML and npu-smi found none)",
                             "say which hardware to plan for, e.g. --gpus 1x24G, --gpus 2xA100-80G or --gpus 8x910B")
        ctx["gpus_source"] = "detected on this host"
    if getattr(sel, "note", ""):
        ctx["assumptions"].append(sel.note)
    hw = sel.hardware
    device = o.device or ("npu" if hw.vendor == "ascend" else "cuda")

    quant = recipe.quant
    if quant in ("nf4", "int8") and not hw.bnb_4bit_supported:
        ctx["assumptions"].append(f"bitsandbytes {quant} is unavailable on {hw.display_name}: LLM kept in bf16 (LoRA)")
        quant = "none"
        recipe = replace(recipe, quant="none")
    compute = recipe.compute_dtype
    if device == "cpu":
        compute = "fp32"
    elif compute == "bf16" and not hw.bf16_supported:
        ctx["assumptions"].append(f"{hw.display_name} has no bf16: compute dtype fp16")
        compute = "fp16"

    # data: a real dataset file beats the recipe's defaults
    samples, dataset_bytes, images_per_sample = recipe.samples, recipe.dataset_bytes, 1.0 if model.vision else 0.0
    text_tokens = recipe.text_tokens
    if o.dataset:
        from vramplan.inputs.dataset import scan_dataset

        rep = scan_dataset(Path(o.dataset), Path(o.images) if o.images else None, open_images=False)
        if rep.error_count:
            ctx["assumptions"].append(f"--dataset has {rep.error_count} bad record(s), e.g. {rep.errors[0]}; "
                                      "the trainer will stop on them (`vramplan preflight --dataset` lists them)")
        samples = rep.samples
        dataset_bytes = Path(o.dataset).stat().st_size + rep.image_bytes
        images_per_sample = (rep.with_image / rep.samples) if rep.samples else 0.0
        if getattr(rep, "text_tokens_p95", None):
            text_tokens = int(rep.text_tokens_p95)
        ctx["dataset"] = {"samples": rep.samples, "with_image": rep.with_image, "image_bytes": rep.image_bytes,
                          "mean_text_tokens": rep.text_tokens.get("mean", 0),
                          "p95_text_tokens": rep.text_tokens.get("p95", 0)}
    mean_seq = 0
    if o.dataset:
        from vramplan.inputs.token_count import token_stats

        ts = token_stats(Path(o.dataset), model.chat_template, model.path)
        if ts:
            # the longest sample sets the peak (LLaVA #697: OOM after tens of batches); the mean sets the time
            text_tokens = int(ts["max"])
            mean_seq = int(model.image_tokens * images_per_sample + ts["mean"])
            ctx["dataset"]["text_tokens"] = ts
            ctx["assumptions"].append(
                f"--dataset: longest record {ts['max']} text tokens, mean {ts['mean']:.0f} "
                f"({ts['method']}{', sampled' if ts['sampled'] else ''})")
    else:
        ctx["assumptions"].append("time assumes every sample is seq-len tokens long (an upper bound); "
                                  "--dataset FILE gives the real lengths")
    if o.samples is not None:
        samples = o.samples
    seq = min(recipe.max_length, model.image_tokens * (1 if images_per_sample else 0) + text_tokens)
    if o.seq_len is not None:
        seq = o.seq_len
    seq = max(seq, 1)

    cpu_ram = parse_size(o.cpu_ram, "--cpu-ram") if o.cpu_ram else None
    disk = parse_size(o.disk, "--disk") if o.disk else None
    if ctx["gpus_source"] != "--gpus":
        import shutil

        import psutil

        if cpu_ram is None:
            cpu_ram = psutil.virtual_memory().total
            ctx["assumptions"].append(f"CPU RAM: {cpu_ram / 2**30:.1f} GiB measured on this host")
        if disk is None:
            where = Path(o.output_dir or os.getcwd())
            while not where.exists():
                where = where.parent
            disk = shutil.disk_usage(where).free
            ctx["assumptions"].append(f"disk: {disk / 2**30:.1f} GiB free at {where} (measured)")

    calibration = ()
    if o.calibration:
        from vramplan.run.calibration import load_calibration

        calibration = tuple(sorted(load_calibration(o.calibration).items()))
        ctx["assumptions"].append(f"calibration applied from {o.calibration}")
    job = Job(calibration=calibration, mean_seq_len=min(mean_seq, seq) if mean_seq else 0, model=model, recipe=recipe, hardware=hw, nodes=sel.nodes, gpus_per_node=sel.gpus_per_node,
              seq_len=seq, images_per_sample=images_per_sample, samples=max(1, samples), epochs=recipe.epochs,
              compute_dtype=compute, quant=quant, headroom=o.headroom, device=device, cpu_ram_bytes=cpu_ram,
              disk_free_bytes=disk, dataset_bytes=dataset_bytes, base_weights_on_disk=model.path is not None,
              micro_batches=(o.micro_batch,) if o.micro_batch else (), grad_accum=o.grad_accum,
              grad_ckpt=(o.grad_ckpt,) if o.grad_ckpt is not None else
              ((recipe.gradient_checkpointing,) if device == "cpu" else (True, False)),
              zero_stages=(o.zero,) if o.zero is not None else (0, 1, 2, 3),
              offloads=(o.offload,) if o.offload else ("none", "optimizer", "optimizer+params"))
    ctx["selection"] = {"text": o.gpus, "nodes": sel.nodes, "gpus_per_node": sel.gpus_per_node,
                        "gpu": hw.name, "gpu_name": hw.display_name, "memory_bytes": hw.memory_bytes,
                        "by_size_only": getattr(sel, "by_size_only", False)}
    return job, ctx


def cpu_host_selection():
    """This host's CPU as the device (tests, the demo, tiny models): memory = its RAM."""
    import psutil

    from vramplan.inputs.gpus import GpuSelection
    from vramplan.estimate.specs import HardwareSpec
    from vramplan.estimate.timing import CPU_TFLOPS

    ram = psutil.virtual_memory().total
    cores = os.cpu_count() or 1
    hw = HardwareSpec(name="cpu", source="this host (psutil, os.cpu_count)", vendor="cpu",
                      display_name=f"CPU ({cores} cores)", memory_gib=ram / 2**30, marketed_memory_gb=0,
                      bf16_tflops=CPU_TFLOPS, fp16_tflops=CPU_TFLOPS, bf16_supported=False,
                      hbm_bandwidth_gbps=20.0, host_link_gbps=0.0, interconnect="none", interconnect_gbps=0.0,
                      bnb_4bit_supported=True)
    return GpuSelection(nodes=1, gpus_per_node=1, hardware=hw, text="cpu",
                        note=f"device: this host's CPU, {ram / 2**30:.1f} GiB RAM (measured), "
                             f"{CPU_TFLOPS:g} TFLOPS prior")
