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
from vramplan.contract import (
    ALL_LINEAR,
    DTYPES,
    QUANTS,
    RECIPE_TRAIN_KEYS,
    RECIPES,
    TEMPLATES,
    ContractError,
    LoraSpec,
    read_plan,
    recipe_defaults,
    training_refusal,
    value_problem,
)

__all__ = ["LoraSpec", "TrainConfig", "add_flags", "from_args", "from_plan"]

DEVICES = ("auto", "cuda", "cpu", "npu")
ATTNS = ("sdpa", "eager", "flash")  # flash: transformers attn_implementation "flash_attention_2"
VISION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # CLIP's linears (a flag-made vision LoRA)


class _RecipeDefault:
    def __repr__(self) -> str:
        return "<recipe default>"


# A field left at RECIPE_DEFAULT takes the recipe profile's value (profiles/recipes/<recipe>.toml, read by
# vramplan.contract.recipe_defaults): the trainer without a plan trains what vramplan plans for that recipe.
RECIPE_DEFAULT: Any = _RecipeDefault()
RECIPE_FIELDS = (*RECIPE_TRAIN_KEYS, "llm_lora", "vision_lora")


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
    quant: str = RECIPE_DEFAULT
    double_quant: bool = RECIPE_DEFAULT
    compute_dtype: str = RECIPE_DEFAULT
    llm_lora: LoraSpec | None = RECIPE_DEFAULT
    vision_lora: LoraSpec | None = RECIPE_DEFAULT
    train_projector: bool = RECIPE_DEFAULT
    train_llm_full: bool = RECIPE_DEFAULT
    learning_rate: float = RECIPE_DEFAULT
    weight_decay: float = RECIPE_DEFAULT
    warmup_ratio: float = RECIPE_DEFAULT
    lr_scheduler: str = "cosine"
    optimizer: str = RECIPE_DEFAULT
    trainable_dtype: str = "fp32"  # without DeepSpeed: the trained weights' dtype (bf16 = pure bf16)
    modules_to_save: tuple = ()  # peft modules_to_save trained in full: embed_tokens, lm_head
    # k-bit without DeepSpeed: frozen embeddings + lm_head after peft's fp32 upcast: fp32, or bf16 = cast back to
    # the compute dtype as TRL's SFTTrainer does (less memory, no per-step lm_head cast copy)
    kbit_embed_dtype: str = "fp32"
    epochs: float = RECIPE_DEFAULT
    max_steps: int | None = None
    max_length: int = RECIPE_DEFAULT
    gradient_checkpointing: bool = RECIPE_DEFAULT
    attn_implementation: str = "sdpa"
    save_steps: int = RECIPE_DEFAULT
    keep_checkpoints: int = RECIPE_DEFAULT
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
        self._fill_recipe_defaults()
        if self.quant not in QUANTS:
            bad("--quant", f"unknown quantization {self.quant!r}", f"one of {', '.join(QUANTS)}")
        if self.compute_dtype not in DTYPES:
            bad("--compute-dtype", f"unknown dtype {self.compute_dtype!r}", f"one of {', '.join(DTYPES)}")
        if self.chat_template not in TEMPLATES:
            bad("--chat-template", f"unknown template {self.chat_template!r}", f"one of {', '.join(TEMPLATES)}")
        if self.device not in DEVICES:
            bad("--device", f"unknown device {self.device!r}", f"one of {', '.join(DEVICES)}")
        if self.model_path is None and not (self.llm_path and self.vision_path):
            bad("--model", "no model given",
                "pass --model HF_LLAVA_OR_DECODER_DIR, or --llm DIR --vision DIR [--projector FILE]")
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
        # the same checks as plan.json's (vramplan.contract.value_problem): types, ranges, finiteness
        for flag, v, kind, lo in (
                ("--micro-batch", self.micro_batch, int, 1), ("--grad-accum", self.grad_accum, int, 1),
                ("--save-steps", self.save_steps, int, 1), ("--keep-checkpoints", self.keep_checkpoints, int, 1),
                ("--max-length", self.max_length, int, 1), ("--workers", self.dataloader_workers, int, 0),
                ("--seed", self.seed, int, None), ("--epochs", self.epochs, float, 1e-6),
                ("--lr", self.learning_rate, float, 1e-12)):
            problem = value_problem(v, kind, min=lo)
            if problem:
                bad(flag, problem)
        if self.max_steps is not None and value_problem(self.max_steps, int, min=1):
            bad("--max-steps", value_problem(self.max_steps, int, min=1))
        if self.recipe in ("qlora", "lora") and self.llm_lora is None and self.vision_lora is None:
            bad("--recipe", f"{self.recipe} needs an LLM or vision LoRA config", "pass --lora-r/--lora-alpha")
        refused = training_refusal(self.recipe, self.quant, bool(self.train_llm_full), self.device)
        if refused:
            bad("--quant", f"--recipe {self.recipe} with --quant {self.quant}: {refused[2]}",
                "use --recipe lora for no quantization" if self.recipe == "qlora" else "use --quant none")
        if self.ds_config is not None and not isinstance(self.ds_config, dict):
            bad("--deepspeed", "the DeepSpeed config must be a JSON object")
        if self.trainable_dtype not in ("fp32", "bf16", "peft"):
            bad("recipe.trainable_dtype", f"must be fp32, bf16 or peft, not {self.trainable_dtype!r}")
        if self.kbit_embed_dtype not in ("fp32", "bf16"):
            bad("recipe.kbit_embed_dtype", f"must be fp32 or bf16, not {self.kbit_embed_dtype!r}")

    def _fill_recipe_defaults(self) -> None:
        unset = [k for k in RECIPE_FIELDS if getattr(self, k) is RECIPE_DEFAULT]
        if unset:
            defaults = _recipe_defaults(self.recipe)
            for k in unset:
                object.__setattr__(self, k, defaults[k])  # frozen: filled once, while being built

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
    try:
        return recipe_defaults(recipe)
    except ContractError as e:
        raise UsageError.from_contract(e) from None


def _lora(d: dict | None, where: str) -> LoraSpec | None:
    try:
        return LoraSpec.from_dict(d, where)
    except ContractError as e:
        raise UsageError.from_contract(e) from None


def _lora_flag(base: LoraSpec | None, r: int | None, alpha: int | None, targets: tuple[str, ...]) -> LoraSpec | None:
    """--lora-r/--lora-alpha (or the vision pair) over the recipe's LoRA: rank 0 means none; without a
    recipe LoRA the flags make one (alpha defaults to the rank)."""
    if r == 0:
        return None
    if base is None:
        return LoraSpec(r or alpha, alpha or r, 0.05, targets)
    return replace(base, r=r or base.r, alpha=alpha or base.alpha)


def from_plan(path: str, overrides: dict) -> TrainConfig:
    """TrainConfig from a plan.json (docs/contracts.md); a recipe key the plan lacks takes the recipe
    profile's value; `overrides` (flags that are not None) win."""
    try:
        plan = read_plan(path)
    except ContractError as e:
        raise UsageError.from_contract(e, "--plan ") from None
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
        micro_batch=b.get("micro_batch", 1), grad_accum=b.get("grad_accum", 1),  # checked by read_plan
        device=hw.get("device") or "auto", ds_config=plan.get("ds_config"),
        expected_checkpoint_bytes=est.get("checkpoint_bytes"), estimate=est,
    )
    for key in ("llm_lora", "vision_lora"):
        if key in r:  # null: no such LoRA
            kw[key] = _lora(r[key], f"--plan {path}: recipe.{key}")
    if r.get("name"):
        kw["recipe"] = r["name"]
    for key in ("quant", "double_quant", "compute_dtype", "train_projector", "train_llm_full",
                "learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler", "optimizer", "epochs",
                "max_steps", "max_length", "gradient_checkpointing", "attn_implementation", "save_steps",
                "keep_checkpoints", "dataloader_workers", "seed", "trainable_dtype", "kbit_embed_dtype"):
        if r.get(key) is not None:
            kw[key] = r[key]
    if r.get("modules_to_save"):
        kw["modules_to_save"] = tuple(r["modules_to_save"])
    if not kw["dataset"]:
        raise UsageError(f"--plan {path}: data.dataset is missing", "pass --dataset FILE")
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**kw)


def add_flags(ap: argparse.ArgumentParser) -> None:
    a = ap.add_argument
    a("--plan", help="plan.json written by vramplan (flags below override it)")
    a("--model", help="HF-format LLaVA / LLaVA-NeXT dir, or a decoder alone (AutoModelForCausalLM; docs/trainer.md)")
    a("--llm", help="assembly from parts: LLM dir (Llama / Llama-3 / Vicuna)")
    a("--vision", help="assembly from parts: CLIP vision dir")
    a("--projector", help="pretrained projector file (XTuner projector.model.0/2 or LLaVA mm_projector.bin)")
    a("--dataset", help="JSON list of LLaVA `conversations` or `messages` records"), a("--images", help="image folder")
    a("--recipe", choices=RECIPES), a("--quant", choices=QUANTS), a("--compute-dtype", choices=DTYPES)
    a("--chat-template", choices=TEMPLATES), a("--device", choices=DEVICES)
    a("--output", help="run dir (metrics.jsonl, checkpoints/, final/, summary.json)")
    a("--max-steps", type=int), a("--epochs", type=float), a("--lr", type=float)
    a("--micro-batch", type=int), a("--grad-accum", type=int), a("--max-length", type=int)
    a("--save-steps", type=int), a("--keep-checkpoints", type=int), a("--seed", type=int)
    a("--lora-r", type=int, help="LLM LoRA rank (default: the recipe's; 0: none)")
    a("--lora-alpha", type=int)
    a("--vision-lora-r", type=int, help="CLIP tower LoRA rank (default: the recipe's; 0: none)")
    a("--vision-lora-alpha", type=int)
    a("--no-gradient-checkpointing", action="store_true")
    a("--workers", type=int, help="DataLoader worker processes (0: load in the training process)")
    a("--attn", choices=ATTNS, help="attention implementation (from_pretrained attn_implementation)")
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
    common = {"output_dir": ns.output, "max_steps": ns.max_steps, "device": ns.device, "resume": ns.resume or None,
              "dataloader_workers": ns.workers, "attn_implementation": ns.attn}
    if ns.plan:
        over = dict(common)
        if ds is not None:
            over["ds_config"] = ds
        return from_plan(ns.plan, over)
    recipe = ns.recipe or "qlora"
    kw: dict[str, Any] = {}
    if ns.lora_r is not None or ns.lora_alpha is not None:
        kw["llm_lora"] = _lora_flag(_recipe_defaults(recipe)["llm_lora"], ns.lora_r, ns.lora_alpha, (ALL_LINEAR,))
    if ns.vision_lora_r is not None or ns.vision_lora_alpha is not None:
        kw["vision_lora"] = _lora_flag(_recipe_defaults(recipe)["vision_lora"], ns.vision_lora_r,
                                       ns.vision_lora_alpha, VISION_TARGETS)
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

