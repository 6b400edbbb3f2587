"""The estimate as a service: flags -> Job -> candidates -> the pick, and the plans to fall back to.

`run --auto`, `preflight` and `estimate` all go through here, so they see the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vramplan.estimate.param_groups import param_groups
from vramplan.estimate.policy import pick
from vramplan.estimate.search import sweep
from vramplan.plan.request import EstimateOptions, options_from_kwargs
from vramplan.plan.resolve import Context, build_job
from vramplan.plan.traced import traced_info


@dataclass
class EstimateResult:
    options: EstimateOptions
    job: object
    candidates: list
    pick: int | None
    why_not_faster: list[str]
    context: Context
    pick_policy: dict | None = None  # the policy, its tolerance and why the pick won (docs/estimate.md#the-pick)

    def data(self) -> dict:
        j = self.job
        from vramplan.plan.image_size import image_facts

        g = param_groups(j.model, j.recipe)
        return {
            "model": {"name": j.model.name, "family": j.model.family, "path": j.model.path, "params": g.total_params,
                      "trainable_params": g.trainable, **image_facts(j.model),
                      "traced": traced_info(j.model.text)},
            "recipe": recipe_dict(j.recipe),
            "hardware": self.context.selection,
            "gpus_source": self.context.gpus_source,
            "seq_len": j.seq_len, "samples": j.samples, "epochs": j.epochs,
            "compute_dtype": j.compute_dtype, "quant": j.quant, "device": j.device,
            "headroom": j.headroom, "cpu_ram_available_bytes": j.cpu_ram_bytes, "disk_free_bytes": j.disk_free_bytes,
            "param_groups": {"quantized_params": g.quantized_params, "quantized_bytes": g.quantized_bytes,
                             "frozen_params": g.frozen_params, "trainable_llm_lora": g.trainable_llm_lora,
                             "trainable_vision_lora": g.trainable_vision_lora,
                             "trainable_projector": g.trainable_projector, "trainable_llm_full": g.trainable_llm_full},
            "assumptions": list(self.context.assumptions),
            "candidates": [c.to_dict() for c in self.candidates],
            "pick": self.pick,
            "why_not_faster": list(self.why_not_faster),
            "pick_policy": self.pick_policy,
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
    job, ctx = build_job(o)
    cands = sweep(job)
    best, why, policy = pick(cands, job)
    return EstimateResult(o, job, cands, best, why, ctx, policy)


def run_inference_estimate(o: EstimateOptions) -> dict:
    """`--task infer`: the JSON data of the inference estimate, every weight dtype (--quant narrows)."""
    from dataclasses import replace

    from vramplan.estimate.inference import infer_candidates, infer_dtypes, inference_recipe
    from vramplan.estimate.params import count_params
    from vramplan.estimate.types import Quant
    from vramplan.plan.image_size import image_facts

    job, ctx = build_job(replace(o, quant=Quant.NONE))  # the dtypes come from infer_dtypes, not the recipe
    dtypes, notes = infer_dtypes(job, o.quant)
    ctx.assumptions.extend(notes)
    cands, best, reason = infer_candidates(job, o.context, o.batch, dtypes, prompt=o.prompt)
    rows = []
    for c in cands:
        d = c.to_dict()
        d["global_batch"] = o.batch  # device_map splits the layers over the GPUs, not the batch
        rows.append(d)
    m = job.model
    return {
        "task": "infer",
        "model": {
            "name": m.name,
            "family": m.family,
            "path": m.path,
            "params": count_params(m).total,
            "trainable_params": 0,
            **image_facts(m),
            "stored_dtype": m.stored_dtype,
        },
        "recipe": recipe_dict(inference_recipe(job.recipe)),
        "hardware": ctx.selection,
        "gpus_source": ctx.gpus_source,
        "quant": o.quant,
        "dtypes": dtypes,
        "compute_dtype": job.compute_dtype,
        "context": o.context,
        "prompt": o.prompt or o.context,
        "batch": o.batch,
        "headroom": job.headroom,
        "assumptions": ctx.assumptions,
        "candidates": rows,
        "pick": best,
        "pick_reason": reason,
        "why_not_faster": [],
    }


def plan_from_options(o: EstimateOptions, candidate: int | None = None) -> dict:
    from vramplan.plan.plan_json import plan_dict

    return plan_dict(run_estimate(o), candidate)


def fallback_plans(plan: dict, limit: int = 5) -> list[dict]:
    """Plans to try after `plan` ran out of memory, in the order to try them (docs/run.md#oom-fallback).

    Re-runs the estimate with the plan's saved options. Each next plan is the pick's policy applied to the
    fitting candidates that need less GPU memory than the plan before it (more offload, a higher ZeRO stage,
    a smaller micro-batch with more accumulation, or more GPUs): first among those that need at least
    MARGIN_STEP of the card less, a difference the estimate can resolve; only when there are none, among
    any that need less. So each attempt needs less memory than the one that failed before it.
    """
    from vramplan.estimate.policy import MARGIN_STEP, choose
    from vramplan.plan.plan_json import plan_dict

    opts = options_from_kwargs(**plan.get("options", {}))
    res = run_estimate(opts)
    cands = res.candidates
    failed = plan.get("estimate", {})
    last = failed.get("vram_per_gpu_bytes", float("inf"))
    step = MARGIN_STEP * res.job.hardware.memory_bytes
    fs = (failed.get("zero_stage"), failed.get("offload"), failed.get("gpus"), failed.get("micro_batch"),
          failed.get("grad_checkpointing"))
    pool = [i for i, c in enumerate(cands) if c.fits and (c.strategy.zero_stage, c.strategy.offload,
                                                            c.strategy.gpus, c.strategy.micro_batch,
                                                            c.strategy.grad_ckpt) != fs]
    order: list[int] = []
    while len(order) < limit:
        less = [i for i in pool if cands[i].vram_per_gpu_bytes < last]
        best, _ = choose(cands, res.job, [i for i in less if cands[i].vram_per_gpu_bytes <= last - step])
        if best is None:
            best, _ = choose(cands, res.job, less)
        if best is None:
            break
        order.append(best)
        last = cands[best].vram_per_gpu_bytes
    return [plan_dict(res, i, plan.get("output_dir")) for i in order]
