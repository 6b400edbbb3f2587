"""The estimate as a typed request/response: flags -> EstimateOptions -> Job -> candidates -> plan.json.

`run --auto`, `preflight` and `estimate` all go through here, so they see the same numbers.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from vramplan import __version__
from vramplan.errors import NoFitError, UsageError
from vramplan.specs import LoraSpec

PLAN_SCHEMA = "vramplan-plan/1"
DEFAULT_MODEL = "llava-llama3-8b-instruct"
DEFAULT_RECIPE = "qlora"


@dataclass(frozen=True)
class EstimateOptions:
    """The estimate flags. Validation errors name the flag (litgpt style)."""

    model: str | None = None  # --model: profile name or local HF dir
    recipe: str = DEFAULT_RECIPE  # --recipe
    gpus: str | None = None  # --gpus: "1x24G", "2x8xA100-80G"; None = detect on this host
    task: str = "train"  # --task train|infer
    samples: int | None = None  # --samples (default: dataset or recipe)
    epochs: int | None = None  # --epochs
    seq_len: int | None = None  # --seq-len: LLM tokens per sample incl. image tokens
    micro_batch: int | None = None  # --micro-batch (default: searched)
    grad_accum: int | None = None  # --grad-accum (default: keeps the recipe's global batch)
    global_batch: int | None = None  # --global-batch
    lora_r: int | None = None  # --lora-r (LLM LoRA rank)
    quant: str | None = None  # --quant nf4|int8|none
    save_steps: int | None = None  # --save-steps
    keep_checkpoints: int | None = None  # --keep-checkpoints
    headroom: float = 0.10  # --headroom
    zero: int | None = None  # --zero: restrict to one stage
    offload: str | None = None  # --offload: restrict
    grad_ckpt: bool | None = None  # --grad-ckpt/--no-grad-ckpt: restrict
    dataset: str | None = None  # --dataset JSON
    images: str | None = None  # --images DIR
    cpu_ram: str | None = None  # --cpu-ram 64GiB
    disk: str | None = None  # --disk 500GB
    output_dir: str | None = None  # --output: where checkpoints go (disk measured there)
    context: int = 4096  # --context (infer): tokens of KV cache per sequence
    batch: int = 1  # --batch (infer): concurrent sequences
    calibration: str | None = None  # --calibration FILE
    device: str | None = None  # --device cuda|npu|cpu (default: from the GPUs)

    def __post_init__(self) -> None:
        def bad(flag, msg, hint=""):
            raise UsageError(f"{flag}: {msg}", hint)

        if self.task not in ("train", "infer"):
            bad("--task", f"must be train or infer, not {self.task!r}")
        for flag, v in (("--samples", self.samples), ("--epochs", self.epochs), ("--seq-len", self.seq_len),
                        ("--micro-batch", self.micro_batch), ("--grad-accum", self.grad_accum),
                        ("--global-batch", self.global_batch), ("--lora-r", self.lora_r),
                        ("--save-steps", self.save_steps), ("--context", self.context), ("--batch", self.batch)):
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(flag, f"must be a positive integer, got {v!r}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            bad("--keep-checkpoints", "must be at least 1 (the last good checkpoint is never deleted)")
        if not 0 <= self.headroom < 0.9:
            bad("--headroom", f"must be a fraction in [0, 0.9), got {self.headroom}", "e.g. --headroom 0.1 for 10%")
        if self.quant is not None and self.quant not in ("nf4", "int8", "none"):
            bad("--quant", f"must be nf4, int8 or none, not {self.quant!r}")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            bad("--zero", f"must be 0, 1, 2 or 3, not {self.zero}")
        if self.offload is not None and self.offload not in ("none", "optimizer", "optimizer+params"):
            bad("--offload", f"must be none, optimizer or optimizer+params, not {self.offload!r}")
        if self.device is not None and self.device not in ("cuda", "npu", "cpu"):
            bad("--device", f"must be cuda, npu or cpu, not {self.device!r}")
        if self.dataset is not None and not Path(self.dataset).is_file():
            bad("--dataset", f"no such file: {self.dataset}", "give the path of a LLaVA-format JSON file")
        if self.images is not None and not Path(self.images).is_dir():
            bad("--images", f"no such directory: {self.images}")


def load_plan(path: str) -> dict:
    """Read a plan.json (docs/contracts.md); a bad file is one UsageError naming --plan."""
    import json

    hint = "write one with `vramplan estimate --save-plan FILE`"
    try:
        plan = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--plan {path}: {e.strerror or e}", hint) from None
    except ValueError as e:
        raise UsageError(f"--plan {path}: not valid JSON ({e})", hint) from None
    if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA:
        raise UsageError(f"--plan {path}: not a vramplan plan (schema must be {PLAN_SCHEMA!r})", hint)
    return plan


def options_from_kwargs(**kwargs) -> EstimateOptions:
    names = {f.name for f in fields(EstimateOptions)}
    return EstimateOptions(**{k: v for k, v in kwargs.items() if k in names and v is not None})


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
    from vramplan import gpus as gpus_mod
    from vramplan.hf_model import resolve_model
    from vramplan.planner import Job
    from vramplan.profiles import load_recipe
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
        from vramplan.dataset_check import scan_dataset

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
        from vramplan.token_count import token_stats

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
        from vramplan.calibration import load_calibration

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

    from vramplan.gpus import GpuSelection
    from vramplan.specs import HardwareSpec
    from vramplan.timing import CPU_TFLOPS

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


@dataclass
class EstimateResult:
    options: EstimateOptions
    job: object
    candidates: list
    pick: int | None
    why_not_faster: list[str]
    context: dict

    def data(self) -> dict:
        j = self.job
        from vramplan.param_groups import param_groups

        g = param_groups(j.model, j.recipe)
        return {
            "model": {"name": j.model.name, "path": j.model.path, "params": g.total_params,
                      "trainable_params": g.trainable, "image_tokens": j.model.image_tokens},
            "recipe": recipe_dict(j.recipe),
            "hardware": self.context["selection"],
            "gpus_source": self.context["gpus_source"],
            "seq_len": j.seq_len, "samples": j.samples, "epochs": j.epochs,
            "compute_dtype": j.compute_dtype, "quant": j.quant, "device": j.device,
            "headroom": j.headroom, "cpu_ram_available_bytes": j.cpu_ram_bytes, "disk_free_bytes": j.disk_free_bytes,
            "param_groups": {"quantized_params": g.quantized_params, "quantized_bytes": g.quantized_bytes,
                             "frozen_params": g.frozen_params, "trainable_llm_lora": g.trainable_llm_lora,
                             "trainable_vision_lora": g.trainable_vision_lora,
                             "trainable_projector": g.trainable_projector, "trainable_llm_full": g.trainable_llm_full},
            "assumptions": list(self.context["assumptions"]),
            "candidates": [c.to_dict() for c in self.candidates],
            "pick": self.pick,
            "why_not_faster": list(self.why_not_faster),
        }


def recipe_dict(r) -> dict:
    d = asdict(r)
    for k in ("llm_lora", "vision_lora"):
        if d.get(k):
            d[k]["targets"] = list(d[k]["targets"])
            if d[k]["targets"] == ["all-linear"]:
                d[k]["targets"] = "all-linear"
    return d


def run_estimate(o: EstimateOptions) -> EstimateResult:
    from vramplan.planner import pick, sweep

    job, ctx = build_job(o)
    cands = sweep(job)
    best, why = pick(cands)
    return EstimateResult(o, job, cands, best, why, ctx)


def plan_dict(res: EstimateResult, index: int | None = None, output_dir: str | None = None) -> dict:
    """The plan.json for one candidate (docs/contracts.md)."""
    i = res.pick if index is None else index
    if i is None:
        raise NoFitError("no candidate fits this hardware, so there is no plan to save",
                         hint="see the reasons in `vramplan estimate`; try more GPUs, --quant nf4 or a smaller --seq-len")
    if not 0 <= i < len(res.candidates):
        raise UsageError(f"--candidate: {i} is out of range (0..{len(res.candidates) - 1})")
    c, j = res.candidates[i], res.job
    s = c.strategy
    r = j.recipe
    launcher = "python" if s.gpus == 1 else "torchrun"

    def lora(lc: LoraSpec | None):
        if lc is None:
            return None
        t = list(lc.targets)
        return {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "targets": "all-linear" if t == ["all-linear"] else t}

    out = output_dir or res.options.output_dir
    return {
        "schema": PLAN_SCHEMA,
        "vramplan_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"profile": None if j.model.path else j.model.name, "path": j.model.path, "llm_path": None,
                  "vision_path": None, "projector_path": None, "hf_ids": dict(j.model.hf_ids),
                  "chat_template": j.model.chat_template},
        "recipe": {"name": r.name, "quant": j.quant, "double_quant": r.double_quant, "compute_dtype": j.compute_dtype,
                   "llm_lora": lora(r.llm_lora), "vision_lora": lora(r.vision_lora) if j.model.vision else None,
                   "train_projector": r.train_projector, "train_llm_full": r.train_llm_full,
                   "learning_rate": r.learning_rate, "weight_decay": r.weight_decay, "warmup_ratio": r.warmup_ratio,
                   "lr_scheduler": "cosine", "optimizer": r.optimizer, "epochs": r.epochs, "max_steps": None,
                   "max_length": j.seq_len, "image_tokens": j.model.image_tokens,
                   "gradient_checkpointing": s.grad_ckpt, "attn_implementation": j.attn,
                   "save_steps": r.save_steps, "keep_checkpoints": r.keep_checkpoints,
                   "dataloader_workers": j.workers, "seed": 42},
        "batch": {"micro_batch": s.micro_batch, "grad_accum": s.grad_accum,
                  "global_batch": s.micro_batch * s.grad_accum * s.gpus},
        "hardware": {"device": j.device, "gpu_profile": j.hardware.name, "gpu_memory_bytes": j.hardware.memory_bytes,
                     "nodes": s.nodes, "gpus_per_node": min(s.gpus, j.gpus_per_node), "total_gpus": s.gpus},
        "strategy": {"zero_stage": s.zero_stage, "offload": s.offload, "launcher": launcher},
        "ds_config": c.ds_config,
        "data": {"dataset": str(Path(res.options.dataset).resolve()) if res.options.dataset else None,
                 "images": str(Path(res.options.images).resolve()) if res.options.images else None,
                 "samples": j.samples},
        "output_dir": str(Path(out).resolve()) if out else None,
        "estimate": c.to_dict(),
        "options": {k: v for k, v in asdict(res.options).items() if v is not None},
        "candidate_index": i,
    }


def plan_from_options(o: EstimateOptions, candidate: int | None = None) -> dict:
    return plan_dict(run_estimate(o), candidate)


def fallback_plans(plan: dict, limit: int = 5) -> list[dict]:
    """Plans to try after `plan` ran out of memory, best first.

    Re-runs the estimate with the plan's saved options and keeps fitting candidates that need
    less GPU memory than the failed one, preferring (in rank order) more offload / a higher ZeRO
    stage, then a smaller micro-batch with more accumulation (global batch kept), then more GPUs.
    """
    opts = options_from_kwargs(**plan.get("options", {}))
    res = run_estimate(opts)
    failed = plan.get("estimate", {})
    limit_bytes = failed.get("vram_per_gpu_bytes", float("inf"))
    fs = (failed.get("zero_stage"), failed.get("offload"), failed.get("gpus"), failed.get("micro_batch"),
          failed.get("grad_checkpointing"))
    order = []
    for i, c in enumerate(res.candidates):
        s = c.strategy
        if not c.fits or (s.zero_stage, s.offload, s.gpus, s.micro_batch, s.grad_ckpt) == fs:
            continue
        if c.vram_per_gpu_bytes >= limit_bytes:
            continue
        order.append(i)
    from vramplan.planner import rank_key

    order.sort(key=lambda i: rank_key(res.candidates[i]))
    return [plan_dict(res, i, plan.get("output_dir")) for i in order[:limit]]
