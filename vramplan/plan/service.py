"""The estimate as a typed request/response: flags -> EstimateOptions -> Job -> candidates -> plan.json.

`run --auto`, `preflight` and `estimate` all go through here, so they see the same numbers.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from pathlib import Path

from vramplan import __version__
from vramplan.errors import NoFitError, UsageError
from vramplan.plan.resolve import build_job
from vramplan.plan.request import PLAN_SCHEMA, EstimateOptions, options_from_kwargs
from vramplan.estimate.specs import LoraSpec

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
        from vramplan.estimate.param_groups import param_groups

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
    from vramplan.estimate.search import pick, sweep

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
    from vramplan.estimate.search import rank_key

    order.sort(key=lambda i: rank_key(res.candidates[i]))
    return [plan_dict(res, i, plan.get("output_dir")) for i in order[:limit]]
