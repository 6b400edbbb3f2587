"""`vramplan estimate`: every config's VRAM, CPU RAM, disk, checkpoint size and time; the pick."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vramplan.commands.output import CommandResult, run_command
from vramplan.errors import ExitCode, UsageError
from vramplan.estimate.optimizers import KBIT_EMBED_DTYPES, OPTIMIZERS
from vramplan.estimate.types import SPEED_TOLERANCE, Offload


def estimate_options(f):
    """The flags shared by estimate, preflight and run (they all plan the same way)."""
    opts = [
        click.option(
            "--model",
            help="Model profile (see `vramplan profiles`) or a local Hugging Face model dir. "
            "Default: llava-llama3-8b-instruct.",
        ),
        click.option("--recipe", default="qlora", show_default=True, help="qlora | lora | pretrain | full"),
        click.option(
            "--gpus",
            help="e.g. 1x24G, 2x80G, 8x910B, 2xA100-80G, 4xH100, 2x8xA100-80G (nodes x GPUs). "
            "Default: the GPUs/NPUs detected on this host.",
        ),
        click.option("--task", type=click.Choice(["train", "infer"]), default="train", show_default=True),
        click.option("--samples", type=int, help="Training samples (default: --dataset, else the recipe's dataset)."),
        click.option("--epochs", type=int),
        click.option("--seq-len", "seq_len", type=int, help="LLM tokens per sample incl. the image tokens."),
        click.option("--micro-batch", "micro_batch", type=int, help="Per-GPU micro-batch (default: searched)."),
        click.option(
            "--grad-accum", "grad_accum", type=int, help="Gradient accumulation (default: keeps the global batch)."
        ),
        click.option("--global-batch", "global_batch", type=int, help="Samples per optimizer step over all GPUs."),
        click.option("--lora-r", "lora_r", type=int, help="LLM LoRA rank."),
        click.option("--quant", type=click.Choice(["nf4", "int8", "none"]),
                     help="LLM weight quantization (--task infer: show only this dtype)."),
        click.option("--save-steps", "save_steps", type=int),
        click.option("--keep-checkpoints", "keep_checkpoints", type=int),
        click.option(
            "--headroom", type=float, default=0.10, show_default=True, help="Fraction of GPU memory kept free."
        ),
        click.option(
            "--speed-tolerance",
            "speed_tolerance",
            type=float,
            default=SPEED_TOLERANCE,
            show_default=True,
            help="Pick: plans within this fraction of the fastest count as equally fast; of those, the larger "
            "memory margin, lower ZeRO stage, less offload win (docs/estimate.md#the-pick).",
        ),
        click.option("--zero", type=click.Choice(["0", "1", "2", "3", "none"]),
                     help="Only this ZeRO stage; none = plain PyTorch (HF Trainer without DeepSpeed)."),
        click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)),
                     help="Optimizer (HF `optim`; default: the recipe's). 8-bit: bitsandbytes blockwise states."),
        click.option("--trainable-dtype", "trainable_dtype", type=click.Choice(["fp32", "bf16", "peft"]),
                     help="Plain PyTorch: dtype of the trained weights and their states (bf16 = pure bf16; peft = "
                     "fp32 adapters, modules_to_save copies in the model's dtype, as peft leaves them)."),
        click.option("--lora-targets", "lora_targets",
                     help="LLM LoRA target modules, comma-separated (e.g. q_proj,v_proj; all-linear; lm_head)."),
        click.option("--lora-dropout", "lora_dropout", type=float, help="LLM LoRA dropout (0 saves no dropped copy)."),
        click.option("--double-quant/--no-double-quant", "double_quant", default=None,
                     help="NF4 double quantization of the absmax values."),
        click.option("--modules-to-save", "modules_to_save",
                     help="Modules trained in full beside LoRA (peft modules_to_save): embed_tokens,lm_head."),
        click.option("--kbit-embed-dtype", "kbit_embed_dtype", type=click.Choice(list(KBIT_EMBED_DTYPES)),
                     help="QLoRA without DeepSpeed: dtype of the frozen embeddings and lm_head after peft's "
                     "k-bit preparation upcast them (fp32: peft alone, the default; bf16: cast back, as TRL's "
                     "SFTTrainer and qlora.py do under bf16: less memory)."),
        click.option("--offload", type=click.Choice(list(Offload.ALL)), help="Only this offload."),
        click.option("--grad-ckpt/--no-grad-ckpt", "grad_ckpt", default=None, help="Only with/without checkpointing."),
        click.option("--dataset", type=click.Path(), help="LLaVA-format JSON: samples and text lengths come from it."),
        click.option("--images", type=click.Path(), help="Image folder of --dataset."),
        click.option("--image-size", "image_size",
                     help="Image size in pixels, HxW (e.g. 672x336) or N for NxN: sets a VLM's image tokens "
                     "(default: the largest image of --dataset, else the processor's default size)."),
        click.option("--cpu-ram", "cpu_ram", help="CPU RAM per node, e.g. 128GiB (default on this host: measured)."),
        click.option("--disk", help="Free disk for the run, e.g. 500GB (default on this host: measured)."),
        click.option("--context", type=int, default=4096, show_default=True, help="Inference: KV-cache tokens."),
        click.option("--prompt", type=int, help="Inference: prompt tokens prefilled at once (default: all of "
                     "--context; the rest of the context is generated one token at a time)."),
        click.option("--batch", type=int, default=1, show_default=True, help="Inference: concurrent sequences."),
        click.option("--device", type=click.Choice(["cuda", "npu", "cpu"]), help="Override the device kind."),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="DataLoader worker processes per GPU (more CPU RAM; faster image decoding).",
        ),
        click.option(
            "--attn",
            type=click.Choice(["sdpa", "eager", "flash"]),
            default="sdpa",
            show_default=True,
            help="Attention implementation (eager also saves the attention probabilities: more memory; "
            "flash = FlashAttention-2, CUDA only).",
        ),
        click.option("--calibration", type=click.Path(), help="Calibration file from `vramplan calibrate --write`."),
        click.option("--ds-buckets", "ds_buckets",
                     help="reduce,allgather bucket sizes in elements of the DeepSpeed config the run uses (reduce: "
                     "ZeRO-1/2/3; allgather: ZeRO-1/2), "
                     "e.g. auto,5e8 (auto = hidden^2, as the HF Trainer fills it; default: vramplan's 2e8,2e8)."),
        click.option("--pad-mask/--no-pad-mask", "pad_mask", default=None,
                     help="Micro-batches of 2+ samples are right-padded and the attention takes the padding mask, as "
                     "the bundled trainer does (default: yes, unless --dataset's records are one length). "
                     "--no-pad-mask: packed batches, or a trainer that masks padding in the loss only (LitGPT); "
                     "under SDPA the mask costs 2 B per query-key pair per layer."),
        click.option("--trace", is_flag=True, default=False,
                     help="Trace the training step (needs the train extra) instead of deriving it, for a known "
                     "architecture too: a cross-check. Unknown architectures are always traced."),
        click.option("--bnb-version", "bnb_version",
                     help="bitsandbytes release the run will use, e.g. 0.41.1 (default: the installed one; "
                     "before 0.43.2 every 4-bit Linear keeps its input for backward: more memory)."),
        click.option("--transformers-version", "transformers_version",
                     help="transformers release the run will use, e.g. 4.45.2 (default: the installed one; "
                     "before 5 a mixture of experts keeps one Linear per expert, quantized under QLoRA)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("estimate", epilog="""\b
Examples:
  $ vramplan estimate --gpus 1x24G
  $ vramplan estimate --gpus 2x80G --recipe lora --model llava-v1.5-13b
  $ vramplan estimate --model llava-v1.5-13b --recipe pretrain --gpus 8x910B
  $ vramplan estimate --gpus 1x24G --task infer --context 8192
  $ vramplan estimate --gpus 1x24G --json --save-plan plan.json""")
@estimate_options
@click.option("--output", "output_dir", type=click.Path(), help="Run directory (disk is measured there on this host).")
@click.option("--json", "json_mode", is_flag=True, help="Print the versioned JSON envelope on stdout.")
@click.option("--explain", is_flag=True, help="Print every component with its formula and source.")
@click.option("--all", "show_all", is_flag=True, help="One row per candidate instead of the best per combination.")
@click.option("--save-plan", "save_plan", type=click.Path(), help="Write the picked candidate as plan.json.")
@click.option("--candidate", type=int, help="With --save-plan: the candidate index to save instead of the pick.")
def command(json_mode: bool, explain: bool, show_all: bool, save_plan: str | None, candidate: int | None,
            **kwargs) -> None:
    """Estimate GPU memory (GiB), CPU RAM, disk, checkpoint size and time for every
    ZeRO stage x offload x GPU count x micro-batch x checkpointing combination, and pick one."""

    def body() -> CommandResult:
        from vramplan.plan.request import options_from_kwargs

        opts = options_from_kwargs(**kwargs)
        if candidate is not None and not save_plan:
            raise UsageError(f"--candidate {candidate} without --save-plan: the index picks the candidate to save",
                             "add --save-plan FILE, or leave --candidate out")
        if opts.task == "infer" and save_plan:
            raise UsageError(f"--save-plan {save_plan} with --task infer: a plan is for training (vramplan run, "
                             "python -m train); inference has none to save",
                             "leave --save-plan out, or use --task train")
        if opts.task == "infer":
            from vramplan.commands.estimate_render import render_infer
            from vramplan.plan.service import run_inference_estimate

            data = run_inference_estimate(opts)
            ok = data["pick"] is not None
            return CommandResult("ok" if ok else "no_fit", ExitCode.OK if ok else ExitCode.NO_FIT, data,
                                 render=lambda con: render_infer(con, data))
        from vramplan.commands.estimate_render import render_estimate
        from vramplan.plan.plan_json import plan_dict
        from vramplan.plan.service import run_estimate

        res = run_estimate(opts)
        data = res.data()
        if save_plan:
            plan = plan_dict(res, candidate)
            p = Path(save_plan)
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps(plan, indent=2, sort_keys=True))
            except OSError as e:
                raise UsageError(f"--save-plan: cannot write {p}: {e.strerror}", "choose a writable path") from None
            data["plan_file"] = str(p.resolve())
        ok = res.pick is not None
        return CommandResult("ok" if ok else "no_fit", ExitCode.OK if ok else ExitCode.NO_FIT, data,
                             render=lambda con: render_estimate(con, data, explain=explain, show_all=show_all))

    run_command("estimate", json_mode, body)
