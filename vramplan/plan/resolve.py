"""Resolve the flags (EstimateOptions) into an estimate Job, one input at a time: the model and recipe,
the hardware, the dataset, this host's RAM and disk, and a calibration file. All I/O of planning is here
and in vramplan/inputs/; vramplan/estimate/ only computes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.estimate.types import Quant
from vramplan.plan.request import DEFAULT_MODEL, EstimateOptions, parse_ds_buckets


@dataclass
class Context:
    """What resolution found or assumed, for the output (not used by the estimate)."""

    assumptions: list[str] = field(default_factory=list)
    gpus_source: str = ""
    selection: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DataFacts:
    samples: int
    dataset_bytes: int
    images_per_sample: float
    seq_len: int
    mean_seq_len: int  # 0 = unknown (time assumes seq_len)
    dataset_source: str = "assumed"  # measured (--dataset) | scaled (--samples) | assumed (the recipe's default)
    dataset_on_disk: bool = False  # --dataset: its files already occupy this machine's disk
    uniform_lengths: bool = False  # --dataset: every record has the same length (micro-batches need no padding)


def _apply_overrides(recipe, o: EstimateOptions, model):
    changes = {}
    if o.quant is not None:
        changes["quant"] = o.quant
    if o.lora_r is not None:
        if recipe.llm_lora is None:
            raise UsageError(f"--lora-r: recipe {recipe.name!r} trains no LLM LoRA", "use --recipe qlora or lora")
        changes["llm_lora"] = replace(recipe.llm_lora, r=o.lora_r)
    lora_changes = {k: v for k, v in (("targets", tuple(t.strip() for t in (o.lora_targets or "").split(",")
                                                            if t.strip()) or None), ("dropout", o.lora_dropout))
                    if v is not None}
    if lora_changes:
        if recipe.llm_lora is None:
            raise UsageError(f"--lora-targets/--lora-dropout: recipe {recipe.name!r} trains no LLM LoRA",
                             "use --recipe qlora or lora")
        changes["llm_lora"] = replace(changes.get("llm_lora", recipe.llm_lora), **lora_changes)
    if o.modules_to_save is not None:
        changes["modules_to_save"] = tuple(m.strip() for m in o.modules_to_save.split(",") if m.strip())
    for key in ("epochs", "save_steps", "keep_checkpoints", "global_batch", "optimizer", "trainable_dtype",
                "double_quant", "kbit_embed_dtype"):
        if getattr(o, key) is not None:
            changes[key] = getattr(o, key)
    if o.seq_len is not None:
        if model.vision is not None and o.seq_len <= model.image_tokens:
            raise UsageError(f"--seq-len: {o.seq_len} leaves no room for text after {model.image_tokens} image tokens",
                             f"use --seq-len > {model.image_tokens}")
        changes["max_length"] = o.seq_len
    return replace(recipe, **changes) if changes else recipe


def resolve_hardware(o: EstimateOptions, ctx: Context):
    """--gpus, or --device cpu (this host's CPU), or the GPUs/NPUs detected here."""
    from vramplan.inputs import gpus as gpus_mod

    if o.gpus:
        sel, ctx.gpus_source = gpus_mod.parse_gpus(o.gpus), "--gpus"
    elif o.device == "cpu":
        sel, ctx.gpus_source = cpu_host_selection(), "this host's CPU (--device cpu)"
    else:
        sel = gpus_mod.detect_local_gpus()
        if sel is None:
            raise UsageError("no GPU or NPU detected on this host (NVML and npu-smi found none)",
                             "say which hardware to plan for, e.g. --gpus 1x24G, --gpus 2xA100-80G or --gpus 8x910B")
        ctx.gpus_source = "detected on this host"
    if sel.note:
        ctx.assumptions.append(sel.note)
    hw = sel.hardware
    ctx.selection = {"text": o.gpus, "nodes": sel.nodes, "gpus_per_node": sel.gpus_per_node,
                     "gpu": hw.name, "gpu_name": hw.display_name, "memory_bytes": hw.memory_bytes,
                     "by_size_only": sel.by_size_only}
    return sel


def _dtypes(recipe, hw, device: str, ctx: Context):
    """(recipe, quant, compute dtype) the device can run: no bitsandbytes k-bit where it has no kernels,
    fp32 on a CPU device, fp16 where there is no bf16."""
    quant = recipe.quant
    if quant in Quant.KBIT and not hw.bnb_4bit_supported:
        ctx.assumptions.append(f"bitsandbytes {quant} is unavailable on {hw.display_name}: LLM kept in bf16 (LoRA)")
        quant = Quant.NONE
        recipe = replace(recipe, quant=Quant.NONE)
    compute = recipe.compute_dtype
    if device == "cpu":
        compute = "fp32"
    elif compute == "bf16" and not hw.bf16_supported:
        ctx.assumptions.append(f"{hw.display_name} has no bf16: compute dtype fp16")
        compute = "fp16"
    return recipe, quant, compute


PINNED_BNB = "0.50.2"  # constraints.txt's bitsandbytes: assumed where none is installed


def resolve_bnb(o: EstimateOptions, quant: str, ctx: Context) -> bool:
    """Whether bitsandbytes' MatMul4Bit keeps each 4-bit Linear's input (Job.kbit_saves_inputs): before
    priors.BNB_DROPS_KBIT_INPUT. --bnb-version, else the installed one (metadata only), else the pinned one."""
    from vramplan.estimate.priors import BNB_DROPS_KBIT_INPUT
    from vramplan.plan.request import release, version_tuple

    ver, where = release(o.bnb_version, "--bnb-version", "bitsandbytes", PINNED_BNB)
    saves = version_tuple(ver) < BNB_DROPS_KBIT_INPUT
    if quant == Quant.NF4:
        what = "every 4-bit Linear's input for backward" if saves else "no 4-bit Linear's input"
        ctx.assumptions.append(f"bitsandbytes {ver} ({where}): MatMul4Bit keeps {what}")
    return saves


def scan(o: EstimateOptions, model):
    """The --dataset scan (None without it); with image sizes when the model's image tokens depend on them."""
    if not o.dataset:
        return None
    from vramplan.inputs.dataset import scan_dataset
    from vramplan.plan.image_size import size_matters

    return scan_dataset(Path(o.dataset), Path(o.images) if o.images else None, open_images=False,
                        image_sizes=o.image_size is None and size_matters(model))


def resolve_data(o: EstimateOptions, model, recipe, ctx: Context, rep=None) -> DataFacts:
    """Samples, bytes, images and token lengths: from --dataset (its scan `rep`) when given, else the
    recipe's defaults."""
    samples, dataset_bytes = recipe.samples, recipe.dataset_bytes
    images_per_sample = 1.0 if model.vision else 0.0
    text_tokens, mean_seq, uniform = recipe.text_tokens, 0, False
    if o.dataset:
        from vramplan.inputs.token_count import token_stats

        rep = rep or scan(o, model)
        if rep.error_count:
            ctx.assumptions.append(f"--dataset has {rep.error_count} bad record(s), e.g. {rep.errors[0]}; "
                                   "the trainer will stop on them (`vramplan preflight --dataset` lists them)")
        samples = rep.samples
        dataset_bytes = Path(o.dataset).stat().st_size + rep.image_bytes
        images_per_sample = (rep.with_image / rep.samples) if rep.samples else 0.0
        if rep.text_tokens_p95:
            text_tokens = int(rep.text_tokens_p95)
        ts = token_stats(Path(o.dataset), model.chat_template, model.path)
        if ts:
            # the longest sample sets the peak (haotian-liu/LLaVA issue #697: OOM after tens of batches);
            # the mean sets the time
            text_tokens = int(ts["max"])
            mean_seq = int(model.image_tokens * images_per_sample + ts["mean"])
            uniform = ts["max"] == ts["mean"] and images_per_sample in (0.0, 1.0)
            ctx.assumptions.append(
                f"--dataset: longest record {ts['max']} text tokens, mean {ts['mean']:.0f} "
                f"({ts['method']}{'; mean over a sample' if ts['sampled'] else ''})")
    elif o.task == "train":
        ctx.assumptions.append("time assumes every sample is seq-len tokens long (an upper bound); "
                               "--dataset FILE gives the real lengths")
    if o.samples is not None:
        samples = o.samples
    dataset_bytes, source = _dataset_disk(o, recipe, samples, dataset_bytes, ctx)
    image = model.image_tokens * (1 if images_per_sample else 0)
    seq = min(recipe.max_length, image + text_tokens)
    if o.seq_len is not None:
        seq = o.seq_len
    elif image and recipe.max_length <= image:  # anyres images outgrow LLaVA-1.5's 2048: keep the text
        seq = image + text_tokens
        ctx.assumptions.append(f"seq {seq} tokens: the recipe's max_length {recipe.max_length} leaves no room for "
                               f"text after {image} image tokens (--seq-len sets it)")
    seq = max(seq, 1)
    return DataFacts(max(1, samples), dataset_bytes, images_per_sample, seq, min(mean_seq, seq) if mean_seq else 0,
                     source, bool(o.dataset), uniform)


def _dataset_disk(o: EstimateOptions, recipe, samples: int, dataset_bytes: int, ctx: Context) -> tuple[int, str]:
    """(dataset bytes, source): measured with --dataset (its files are on this machine, so no new disk);
    scaled from the recipe's bytes per sample with --samples; else the recipe's full dataset
    (docs/estimate.md#cpu-ram-and-disk)."""
    from vramplan.units import fmt_bytes

    if o.dataset:
        ctx.assumptions.append(f"disk: the dataset ({fmt_bytes(dataset_bytes)}, measured) is already on this "
                               "machine: not counted as new disk")
        return dataset_bytes, "measured"
    if o.samples is None or not recipe.samples:
        return dataset_bytes, "assumed"
    scaled = int(recipe.dataset_bytes * samples / recipe.samples)
    ctx.assumptions.append(f"disk: dataset {fmt_bytes(scaled)} = {samples} samples x the recipe's "
                           f"{fmt_bytes(recipe.dataset_bytes / recipe.samples)} per sample "
                           f"({recipe.samples} samples, {fmt_bytes(recipe.dataset_bytes)}); --dataset FILE measures it")
    return scaled, "scaled"


def resolve_host(o: EstimateOptions, ctx: Context) -> tuple[int | None, int | None]:
    """(CPU RAM per node, free disk): the flags, else measured on this host when planning for it."""
    from vramplan.units import parse_size

    cpu_ram = parse_size(o.cpu_ram, "--cpu-ram") if o.cpu_ram else None
    disk = parse_size(o.disk, "--disk") if o.disk else None
    if ctx.gpus_source == "--gpus":
        return cpu_ram, disk
    import shutil

    import psutil

    if cpu_ram is None:
        cpu_ram = psutil.virtual_memory().total
        ctx.assumptions.append(f"CPU RAM: {cpu_ram / 2**30:.1f} GiB measured on this host")
    if disk is None:
        where = Path(o.output_dir or os.getcwd())
        while not where.exists():
            where = where.parent
        disk = shutil.disk_usage(where).free
        ctx.assumptions.append(f"disk: {disk / 2**30:.1f} GiB free at {where} (measured)")
    return cpu_ram, disk


def resolve_calibration(o: EstimateOptions, ctx: Context) -> tuple:
    if not o.calibration:
        return ()
    from vramplan.run.calibration import load_calibration

    ctx.assumptions.append(f"calibration applied from {o.calibration}")
    return tuple(sorted(load_calibration(o.calibration).items()))


def build_job(o: EstimateOptions):
    """Resolve names, files and this host's facts into an estimate Job. Returns (job, Context)."""
    from vramplan.estimate.types import Job, Offload
    from vramplan.inputs.model_dir import resolve_model
    from vramplan.inputs.profiles import load_recipe
    from vramplan.plan.image_size import resolve_image_size
    from vramplan.plan.moe_layout import resolve_expert_layout

    ctx = Context()
    model = resolve_expert_layout(o, resolve_model(o.model or DEFAULT_MODEL), ctx)  # a MoE: the expert layout
    rep = scan(o, model)
    model = resolve_image_size(o, model, rep, ctx.assumptions)
    recipe = _apply_overrides(load_recipe(o.recipe), o, model)
    sel = resolve_hardware(o, ctx)
    device = o.device or ("npu" if sel.hardware.vendor == "ascend" else "cuda")
    refuse_untrainable(o, recipe, device, sel.hardware)
    ctx.assumptions += untrained_family_note(o, model, recipe)
    recipe, quant, compute = _dtypes(recipe, sel.hardware, device, ctx)
    if recipe.kbit_embed_dtype == "bf16" and (quant not in Quant.KBIT or o.zero not in (None, "none")):
        ctx.assumptions.append("--kbit-embed-dtype bf16 changes only k-bit plain-PyTorch candidates (" + (
            "no k-bit weights here" if quant not in Quant.KBIT else "DeepSpeed casts the whole module to bf16") + ")")
    kbit_saves_inputs = resolve_bnb(o, quant, ctx)
    data = resolve_data(o, model, recipe, ctx, rep)
    cpu_ram, disk = resolve_host(o, ctx)
    calibration = resolve_calibration(o, ctx)
    cores = 0 if ctx.gpus_source == "--gpus" else (__import__("psutil").cpu_count(logical=False) or 0)
    grad_ckpt = (recipe.gradient_checkpointing,) if device == "cpu" else (True, False)
    buckets = parse_ds_buckets(o.ds_buckets) if o.ds_buckets else ()
    job = Job(model=model, recipe=recipe, hardware=sel.hardware, nodes=sel.nodes, gpus_per_node=sel.gpus_per_node,
              seq_len=data.seq_len, images_per_sample=data.images_per_sample, samples=data.samples,
              epochs=recipe.epochs, compute_dtype=compute, quant=quant, headroom=o.headroom, device=device,
              attn=o.attn, kbit_saves_inputs=kbit_saves_inputs, workers=o.workers, cpu_ram_bytes=cpu_ram,
              cpu_cores=cores, disk_free_bytes=disk, ds_buckets=buckets,
              dataset_bytes=data.dataset_bytes, base_weights_on_disk=model.path is not None,
              dataset_on_disk=data.dataset_on_disk, dataset_source=data.dataset_source,
              micro_batches=(o.micro_batch,) if o.micro_batch else (), grad_accum=o.grad_accum,
              grad_ckpt=(o.grad_ckpt,) if o.grad_ckpt is not None else grad_ckpt,
              zero_stages=(0,) if o.zero == "none" else ((o.zero,) if o.zero is not None else (0, 1, 2, 3)),
              engines=(("torch",) if o.zero == "none" else ("deepspeed",)) if o.zero is not None
              else ("deepspeed", "torch"),
              offloads=(o.offload,) if o.offload else Offload.ALL,
              mean_seq_len=data.mean_seq_len, calibration=calibration, speed_tolerance=o.speed_tolerance,
              padded_batches=o.pad_mask if o.pad_mask is not None else not data.uniform_lengths)
    from vramplan.plan import traced

    if traced.wanted(job, o):  # docs/estimate.md#the-traced-path
        job = traced.attach_trace(job, ctx, train=o.task == "train")
    return job, ctx


def refuse_untrainable(o: EstimateOptions, recipe, device: str, hw) -> None:
    """What the trainer would refuse (vramplan.contract.training_refusal), refused now naming both flags:
    before anything is written or launched."""
    from vramplan.contract import training_refusal

    train = o.task == "train"
    refused = training_refusal(recipe.name if train else "", recipe.quant if train else Quant.NONE,
                               train and recipe.train_llm_full, device, hw.vendor)
    if refused is None:
        return
    what, _other, why = refused
    if what == "recipe":
        quant = f"--quant {o.quant}" if o.quant else f"the recipe's quant {recipe.quant}"
        raise UsageError(f"--recipe {o.recipe} with {quant}: {why}",
                         "use --recipe lora for an unquantized LLM" if recipe.name == "qlora" else "use --quant none")
    gpus = f"--gpus {o.gpus}" if o.gpus else f"the {hw.display_name} detected here"
    raise UsageError(f"--device {device} with {gpus}: {why}",
                     "leave --device out (it follows the GPUs), or name matching --gpus")


def untrained_family_note(o: EstimateOptions, model, recipe) -> list[str]:
    """A family the bundled trainer cannot train yet (vramplan.contract.family_refusal): `estimate` plans it
    and says so; `vramplan run` refuses it (exit 2, commands/run.py)."""
    from vramplan.contract import family_refusal
    from vramplan.plan.plan_json import model_families

    why = family_refusal(model_families(model), recipe.name) if o.task == "train" else None
    return [f"`vramplan run` will refuse this plan: {why}"] if why else []


def cpu_host_selection():
    """This host's CPU as the device (tests, the demo, tiny models): memory = its RAM."""
    import psutil

    from vramplan.estimate.priors import CPU_TFLOPS
    from vramplan.estimate.specs import HardwareSpec
    from vramplan.inputs.gpus import GpuSelection

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
