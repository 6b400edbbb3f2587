"""plan.json: the plan of one candidate, written by `estimate --save-plan` and `run`, read by `preflight --plan`,
`run --plan` and the trainer (docs/contracts.md)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
from pathlib import Path

from vramplan import __version__
from vramplan.contract import PLAN_SCHEMA, ContractError, read_plan
from vramplan.errors import NoFitError, UsageError
from vramplan.estimate.specs import LoraSpec
from vramplan.plan.service import EstimateResult


def plan_dict(res: EstimateResult, index: int | None = None, output_dir: str | None = None) -> dict:
    """The plan.json for one candidate (docs/contracts.md)."""
    i = res.pick if index is None else index
    if i is None:
        raise NoFitError(
            "no candidate fits this hardware, so there is no plan to save",
            hint="see the reasons in `vramplan estimate`; try more GPUs, --quant nf4 or a smaller --seq-len",
        )
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
        return {
            "r": lc.r,
            "alpha": lc.alpha,
            "dropout": lc.dropout,
            "targets": "all-linear" if t == ["all-linear"] else t,
        }

    out = output_dir or res.options.output_dir
    return {
        "schema": PLAN_SCHEMA,
        "vramplan_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"profile": None if j.model.path else j.model.name, "path": j.model.path, "llm_path": None,
                  "vision_path": None, "projector_path": None, "hf_ids": dict(j.model.hf_ids),
                  "chat_template": j.model.chat_template, **model_families(j.model)},
        "recipe": {"name": r.name, "quant": j.quant, "double_quant": r.double_quant, "compute_dtype": j.compute_dtype,
                   "llm_lora": lora(r.llm_lora), "vision_lora": lora(r.vision_lora) if j.model.vision else None,
                   "train_projector": r.train_projector, "train_llm_full": r.train_llm_full,
                   "learning_rate": r.learning_rate, "weight_decay": r.weight_decay, "warmup_ratio": r.warmup_ratio,
                   "lr_scheduler": "cosine", "optimizer": r.optimizer,
                   "trainable_dtype": r.trainable_dtype, "modules_to_save": list(r.modules_to_save),
                   "kbit_embed_dtype": r.kbit_embed_dtype,
                   "epochs": r.epochs, "max_steps": None,
                   "max_length": j.seq_len, "image_tokens": j.model.image_tokens,
                   "gradient_checkpointing": s.grad_ckpt, "attn_implementation": j.attn,
                   "save_steps": r.save_steps, "keep_checkpoints": r.keep_checkpoints,
                   "dataloader_workers": j.workers, "seed": 42},
        "batch": {"micro_batch": s.micro_batch, "grad_accum": s.grad_accum,
                  "global_batch": s.micro_batch * s.grad_accum * s.gpus},
        "hardware": {"device": j.device, "gpu_profile": j.hardware.name, "gpu_memory_bytes": j.hardware.memory_bytes,
                     "nodes": s.nodes, "gpus_per_node": min(s.gpus, j.gpus_per_node), "total_gpus": s.gpus},
        "strategy": {"zero_stage": s.zero_stage, "offload": s.offload, "launcher": launcher, "engine": s.engine},
        "ds_config": c.ds_config,
        "data": {"dataset": str(Path(res.options.dataset).resolve()) if res.options.dataset else None,
                 "images": str(Path(res.options.images).resolve()) if res.options.images else None,
                 "samples": j.samples},
        "output_dir": str(Path(out).resolve()) if out else None,
        "estimate": c.to_dict(),
        "options": {k: v for k, v in asdict(res.options).items() if v is not None},
        "candidate_index": i,
    }



def model_families(model) -> dict:
    """plan.json model.text_family/vision_family/projector_family: the family modules that describe it
    (what vramplan.contract.family_refusal judges)."""
    return {"text_family": model.text.family, "vision_family": model.vision.family if model.vision else None,
            "projector_family": model.projector.family if model.vision and model.projector else None}


def load_plan(path: str) -> dict:
    """Read a plan.json (docs/contracts.md); a bad file is one UsageError naming --plan."""
    try:
        return read_plan(path)
    except ContractError as e:
        raise UsageError(f"--plan {e.message}", e.hint) from None
