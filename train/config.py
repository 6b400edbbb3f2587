"""TrainConfig: everything one training run needs, from plan.json (docs/contracts.md) or CLI flags.

Validation happens in `__post_init__` and names the flag (or plan key) that is wrong.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from train.exit_codes import UsageError

RECIPES = ("qlora", "lora", "pretrain", "full")
QUANTS = ("nf4", "int8", "none")
DTYPES = ("bf16", "fp16", "fp32")
TEMPLATES = ("llama3", "vicuna_v1")
DEVICES = ("auto", "cuda", "cpu", "npu")
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: int
    dropout: float = 0.05
    targets: Any = "all-linear"  # "all-linear" or a list of module names

    @staticmethod
    def from_dict(d: dict | None, where: str) -> "LoraSpec | None":
        if d is None:
            return None
        try:
            t = d.get("targets", "all-linear")
            return LoraSpec(int(d["r"]), int(d["alpha"]), float(d.get("dropout", 0.05)),
                            t if isinstance(t, str) else tuple(t))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{where}: needs r, alpha (ints), dropout, targets ({e})", "see docs/contracts.md") from e


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    dataset: str
    images: str | None = None
    model_path: str | None = None
    llm_path: str | None = None
    vision_path: str | None = None
    projector_path: str | None = None
    chat_template: str = "llama3"
    recipe: str = "qlora"
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bf16"
    llm_lora: LoraSpec | None = LoraSpec(64, 16)
    vision_lora: LoraSpec | None = None
    train_projector: bool = True
    train_llm_full: bool = False
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int = 2048
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    save_steps: int = 500
    keep_checkpoints: int = 2
    dataloader_workers: int = 0
    seed: int = 42
    micro_batch: int = 1
    grad_accum: int = 1
    device: str = "auto"
    ds_config: dict | None = None
    expected_checkpoint_bytes: int | None = None
    estimate: dict = field(default_factory=dict)
    resume: bool = False

    def __post_init__(self) -> None:
        def bad(flag: str, msg: str, hint: str = "") -> None:
            raise UsageError(f"{flag}: {msg}", hint)

        if self.recipe not in RECIPES:
            bad("--recipe", f"unknown recipe {self.recipe!r}", f"one of {', '.join(RECIPES)}")
        if self.quant not in QUANTS:
            bad("--quant", f"unknown quantization {self.quant!r}", f"one of {', '.join(QUANTS)}")
        if self.compute_dtype not in DTYPES:
            bad("--compute-dtype", f"unknown dtype {self.compute_dtype!r}", f"one of {', '.join(DTYPES)}")
        if self.chat_template not in TEMPLATES:
            bad("--chat-template", f"unknown template {self.chat_template!r}", f"one of {', '.join(TEMPLATES)}")
        if self.device not in DEVICES:
            bad("--device", f"unknown device {self.device!r}", f"one of {', '.join(DEVICES)}")
        if self.model_path is None and not (self.llm_path and self.vision_path):
            bad("--model", "no model given", "pass --model HF_LLAVA_DIR, or --llm DIR --vision DIR [--projector FILE]")
        if self.model_path and (self.llm_path or self.vision_path):
            bad("--model", "give either --model or --llm/--vision, not both")
        for flag, p in (("--model", self.model_path), ("--llm", self.llm_path), ("--vision", self.vision_path),
                        ("--projector", self.projector_path), ("--dataset", self.dataset), ("--images", self.images)):
            if flag in ("--model", "--llm", "--vision") and p and is_hub_id(p):
                continue  # a Hugging Face hub id: from_pretrained resolves it (the local cache when offline)
            if p and not Path(p).exists():
                bad(flag, f"{p} does not exist", "check the path")
        if not self.output_dir:
            bad("--output", "no output dir given", "pass --output RUN_DIR")
        for flag, v in (("--micro-batch", self.micro_batch), ("--grad-accum", self.grad_accum),
                        ("--save-steps", self.save_steps), ("--keep-checkpoints", self.keep_checkpoints),
                        ("--max-length", self.max_length)):
            if not isinstance(v, int) or v < 1:
                bad(flag, f"must be a positive integer, got {v!r}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("--max-steps", f"must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            bad("--epochs", f"must be > 0, got {self.epochs}")
        if not self.learning_rate > 0:
            bad("--lr", f"must be > 0, got {self.learning_rate}")
        if self.recipe in ("qlora", "lora") and self.llm_lora is None and self.vision_lora is None:
            bad("--recipe", f"{self.recipe} needs an LLM or vision LoRA config", "pass --lora-r/--lora-alpha")
        if self.recipe == "qlora" and self.quant == "none":
            bad("--quant", "recipe qlora needs a quantized LLM (nf4 or int8)", "use --recipe lora for no quantization")
        if self.ds_config is not None and not isinstance(self.ds_config, dict):
            bad("--deepspeed", "the DeepSpeed config must be a JSON object")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)

    @property
    def zero_stage(self) -> int:
        return int(((self.ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


def is_hub_id(p: str) -> bool:
    """'org/name' that is not a local path: a Hugging Face hub repo id."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", p)) and not Path(p).exists()


def _recipe_defaults(recipe: str) -> dict:
    """Defaults per stage: XTuner's single-GPU LLaVA-Llama-3 QLoRA, LLaVA-1.5 LoRA/pretrain (llava-recipes.md §1, §5)."""
    if recipe == "qlora":
        return {"quant": "nf4", "llm_lora": LoraSpec(64, 16), "learning_rate": 2e-4}
    if recipe == "lora":
        return {"quant": "none", "llm_lora": LoraSpec(128, 256), "learning_rate": 2e-4}
    if recipe == "pretrain":
        return {"quant": "none", "llm_lora": None, "learning_rate": 1e-3}
    return {"quant": "none", "llm_lora": None, "train_llm_full": True, "learning_rate": 2e-5}


def from_plan(path: str, overrides: dict) -> TrainConfig:
    try:
        plan = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--plan {path}: {e.strerror or e}", "write one with `vramplan estimate --save-plan`") from e
    except ValueError as e:
        raise UsageError(f"--plan {path}: not valid JSON ({e})", "write one with `vramplan estimate --save-plan`") from e
    if not isinstance(plan, dict) or plan.get("schema") != "vramplan-plan/1":
        raise UsageError(f"--plan {path}: not a vramplan plan (schema must be 'vramplan-plan/1')", "")
    m, r = plan.get("model") or {}, plan.get("recipe") or {}
    b, d, hw = plan.get("batch") or {}, plan.get("data") or {}, plan.get("hardware") or {}
    est = plan.get("estimate") or {}
    kw: dict[str, Any] = dict(
        output_dir=plan.get("output_dir") or str(Path(path).resolve().parent),
        dataset=d.get("dataset"), images=d.get("images"),
        # a plan made from a profile names no local dir: use the profile's HF-format LLaVA repo id
        model_path=m.get("path") or (None if (m.get("llm_path") or m.get("vision_path"))
                                     else (m.get("hf_ids") or {}).get("llava")),
        llm_path=m.get("llm_path"), vision_path=m.get("vision_path"),
        projector_path=m.get("projector_path"), chat_template=m.get("chat_template") or "llama3",
        llm_lora=LoraSpec.from_dict(r.get("llm_lora"), "plan recipe.llm_lora"),
        vision_lora=LoraSpec.from_dict(r.get("vision_lora"), "plan recipe.vision_lora"),
        micro_batch=int(b.get("micro_batch", 1)), grad_accum=int(b.get("grad_accum", 1)),
        device=hw.get("device") or "auto", ds_config=plan.get("ds_config"),
        expected_checkpoint_bytes=est.get("checkpoint_bytes"), estimate=est,
    )
    if r.get("name"):
        kw["recipe"] = r["name"]
    for key in ("quant", "double_quant", "compute_dtype", "train_projector", "train_llm_full",
                "learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler", "optimizer", "epochs",
                "max_steps", "max_length", "gradient_checkpointing", "attn_implementation", "save_steps",
                "keep_checkpoints", "dataloader_workers", "seed"):
        if r.get(key) is not None:
            kw[key] = r[key]
    if not kw["dataset"]:
        raise UsageError(f"--plan {path}: data.dataset is missing", "pass --dataset FILE")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**kw)


def add_flags(ap: argparse.ArgumentParser) -> None:
    a = ap.add_argument
    a("--plan", help="plan.json written by vramplan (flags below override it)")
    a("--model", help="HF-format LLaVA dir (LlavaForConditionalGeneration)")
    a("--llm", help="assembly from parts: LLM dir (Llama / Llama-3 / Vicuna)")
    a("--vision", help="assembly from parts: CLIP vision dir")
    a("--projector", help="pretrained projector file (XTuner projector.model.0/2 or LLaVA mm_projector.bin)")
    a("--dataset", help="LLaVA-format JSON"), a("--images", help="image folder")
    a("--recipe", choices=RECIPES), a("--quant", choices=QUANTS), a("--compute-dtype", choices=DTYPES)
    a("--chat-template", choices=TEMPLATES), a("--device", choices=DEVICES)
    a("--output", help="run dir (metrics.jsonl, checkpoints/, final/, summary.json)")
    a("--max-steps", type=int), a("--epochs", type=float), a("--lr", type=float)
    a("--micro-batch", type=int), a("--grad-accum", type=int), a("--max-length", type=int)
    a("--save-steps", type=int), a("--keep-checkpoints", type=int), a("--seed", type=int)
    a("--lora-r", type=int), a("--lora-alpha", type=int)
    a("--vision-lora-r", type=int, help="add a LoRA on the CLIP tower with this rank")
    a("--vision-lora-alpha", type=int)
    a("--no-gradient-checkpointing", action="store_true")
    a("--deepspeed", help="DeepSpeed config JSON (ZeRO 0/1/2/3, offload)")
    a("--expected-checkpoint-bytes", type=int, help="free-space check before each save (default: last checkpoint)")
    a("--resume", action="store_true", help="continue from the newest verified checkpoint in RUN_DIR/checkpoints")
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def from_args(ns: argparse.Namespace) -> TrainConfig:
    ds = None
    if ns.deepspeed:
        try:
            ds = json.loads(Path(ns.deepspeed).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--deepspeed {ns.deepspeed}: cannot read a JSON config ({e})", "") from e
    common = {"output_dir": ns.output, "max_steps": ns.max_steps, "device": ns.device, "resume": ns.resume or None}
    if ns.plan:
        over = dict(common)
        if ds is not None:
            over["ds_config"] = ds
        return from_plan(ns.plan, over)
    recipe = ns.recipe or "qlora"
    kw: dict[str, Any] = _recipe_defaults(recipe)
    if ns.lora_r or ns.lora_alpha:
        base = kw.get("llm_lora") or LoraSpec(64, 16)
        kw["llm_lora"] = replace(base, r=ns.lora_r or base.r, alpha=ns.lora_alpha or base.alpha)
    if ns.vision_lora_r:
        kw["vision_lora"] = LoraSpec(ns.vision_lora_r, ns.vision_lora_alpha or ns.vision_lora_r, 0.05, VISION_TARGETS)
    flags = {"dataset": ns.dataset, "images": ns.images, "model_path": ns.model, "llm_path": ns.llm,
             "vision_path": ns.vision, "projector_path": ns.projector, "recipe": recipe, "quant": ns.quant,
             "compute_dtype": ns.compute_dtype, "chat_template": ns.chat_template, "epochs": ns.epochs,
             "learning_rate": ns.lr, "micro_batch": ns.micro_batch, "grad_accum": ns.grad_accum,
             "max_length": ns.max_length, "save_steps": ns.save_steps, "keep_checkpoints": ns.keep_checkpoints,
             "seed": ns.seed, "ds_config": ds, "expected_checkpoint_bytes": ns.expected_checkpoint_bytes,
             "gradient_checkpointing": False if ns.no_gradient_checkpointing else None, **common}
    kw.update({k: v for k, v in flags.items() if v is not None})
    if not kw.get("dataset"):
        raise UsageError("--dataset: no dataset given", "pass --dataset data.json --images DIR, or --plan plan.json")
    if not kw.get("output_dir"):
        raise UsageError("--output: no run dir given", "pass --output RUN_DIR")
    return TrainConfig(**kw)
