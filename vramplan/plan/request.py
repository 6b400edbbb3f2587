"""The estimate's flags as one validated request (EstimateOptions); errors name the flag."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.estimate.optimizers import KBIT_EMBED_DTYPES, OPTIMIZERS, TRAINABLE_DTYPES
from vramplan.estimate.types import ATTN_IMPLEMENTATIONS, DEVICES, SPEED_TOLERANCE, ZERO_STAGES, Offload, Quant

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
    zero: int | str | None = None  # --zero: restrict to one stage; "none" = plain PyTorch (no DeepSpeed)
    offload: str | None = None  # --offload: restrict
    grad_ckpt: bool | None = None  # --grad-ckpt/--no-grad-ckpt: restrict
    dataset: str | None = None  # --dataset JSON
    images: str | None = None  # --images DIR
    image_size: str | None = None  # --image-size HxW or N (square): the images' size (default: --dataset's largest)
    cpu_ram: str | None = None  # --cpu-ram 64GiB
    disk: str | None = None  # --disk 500GB
    output_dir: str | None = None  # --output: where checkpoints go (disk measured there)
    context: int = 4096  # --context (infer): tokens of KV cache per sequence
    prompt: int | None = None  # --prompt (infer): tokens prefilled at once (default: the whole --context)
    batch: int = 1  # --batch (infer): concurrent sequences
    calibration: str | None = None  # --calibration FILE
    device: str | None = None  # --device cuda|npu|cpu (default: from the GPUs)
    workers: int = 0  # --workers: DataLoader worker processes per rank (each costs CPU RAM, speeds up image decoding)
    attn: str = "sdpa"  # --attn sdpa|eager|flash: eager saves the attention probabilities (much more memory)
    speed_tolerance: float = SPEED_TOLERANCE  # --speed-tolerance: the pick's time window, a fraction
    optimizer: str | None = None  # --optimizer (default: the recipe's)
    trainable_dtype: str | None = None  # --trainable-dtype fp32|bf16|peft (plain PyTorch)
    lora_targets: str | None = None  # --lora-targets q_proj,v_proj
    lora_dropout: float | None = None  # --lora-dropout
    double_quant: bool | None = None  # --double-quant/--no-double-quant
    modules_to_save: str | None = None  # --modules-to-save embed_tokens,lm_head
    kbit_embed_dtype: str | None = None  # --kbit-embed-dtype fp32|bf16: frozen embeddings/lm_head of k-bit training
    bnb_version: str | None = None  # --bnb-version 0.41.1: plan for another machine's bitsandbytes
    transformers_version: str | None = None  # --transformers-version 4.45.2: a MoE's expert layout (plan/moe_layout.py)
    ds_buckets: str | None = None  # --ds-buckets auto,5e8: ZeRO-1/2 reduce,allgather bucket elements of a given config
    trace: bool = False  # --trace: the traced path for a known family too (docs/estimate.md#the-traced-path)
    # --pad-mask/--no-pad-mask: micro-batches of 2+ samples are right-padded and attention takes the padding mask
    # (the bundled trainer; None: yes unless --dataset's records are one length); --no-pad-mask: packed batches or a
    # trainer that masks padding in the loss only (LitGPT). More memory under SDPA (activations.py)
    pad_mask: bool | None = None

    def __post_init__(self) -> None:
        def bad(flag, msg, hint=""):
            raise UsageError(f"{flag}: {msg}", hint)

        if self.task not in ("train", "infer"):
            bad("--task", f"must be train or infer, not {self.task!r}")
        for name, flag in STR_FLAGS.items():
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                bad(flag, f"is empty (got {v!r})", f"give {flag} a value, or leave the flag out")
        for flag, v in (("--samples", self.samples), ("--epochs", self.epochs), ("--seq-len", self.seq_len),
                        ("--micro-batch", self.micro_batch), ("--grad-accum", self.grad_accum),
                        ("--global-batch", self.global_batch), ("--lora-r", self.lora_r),
                        ("--save-steps", self.save_steps), ("--context", self.context), ("--batch", self.batch),
                        ("--prompt", self.prompt)):
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(flag, f"must be a positive integer, got {v!r}")
        if None not in (self.global_batch, self.micro_batch, self.grad_accum):
            bad("--global-batch", f"{self.global_batch} with --micro-batch {self.micro_batch} and --grad-accum "
                f"{self.grad_accum}: the global batch is micro-batch x grad-accum x GPUs "
                f"({self.micro_batch * self.grad_accum} x GPUs), so the three flags can contradict each other",
                "give two of --global-batch, --micro-batch, --grad-accum")
        if self.task == "infer":
            train_only = [flag for flag, v in TRAIN_ONLY.items() if getattr(self, v) is not None]
            if train_only:
                raise UsageError(f"{train_only[0]} with --task infer: a training setting the inference estimate "
                                 "does not use (it uses --context and --batch)",
                                 f"leave {train_only[0]} out, or use --task train")
        if self.prompt is not None and (self.task != "infer" or self.prompt > self.context):
            bad("--prompt", f"{self.prompt}: the prompt tokens of --task infer, at most --context ({self.context})",
                "the KV cache holds the prompt and the generated tokens: --context >= --prompt")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            bad("--keep-checkpoints", "must be at least 1 (the last good checkpoint is never deleted)")
        if not 0 <= self.headroom < 0.9:
            bad("--headroom", f"must be a fraction in [0, 0.9), got {self.headroom}", "e.g. --headroom 0.1 for 10%")
        if isinstance(self.speed_tolerance, bool) or not isinstance(self.speed_tolerance, (int, float)) \
                or not 0 <= self.speed_tolerance <= 1:
            bad("--speed-tolerance", f"must be a fraction in [0, 1], got {self.speed_tolerance!r}",
                "e.g. --speed-tolerance 0.1 for 10%")
        if self.quant is not None and self.quant not in Quant.ALL:
            bad("--quant", f"must be nf4, int8 or none, not {self.quant!r}")
        if isinstance(self.zero, str) and self.zero.isdigit():
            object.__setattr__(self, "zero", int(self.zero))
        if self.zero is not None and self.zero not in (*ZERO_STAGES, "none"):
            bad("--zero", f"must be 0, 1, 2, 3 or none, not {self.zero}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            bad("--optimizer", f"must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.trainable_dtype is not None and self.trainable_dtype not in TRAINABLE_DTYPES:
            bad("--trainable-dtype", f"must be fp32, bf16 or peft, not {self.trainable_dtype!r}")
        if self.kbit_embed_dtype is not None and self.kbit_embed_dtype not in KBIT_EMBED_DTYPES:
            bad("--kbit-embed-dtype", f"must be fp32 or bf16, not {self.kbit_embed_dtype!r}")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            bad("--lora-dropout", f"must be a fraction in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not [t for t in self.lora_targets.split(",") if t.strip()]:
            bad("--lora-targets", "names no module", "e.g. --lora-targets q_proj,v_proj")
        if self.modules_to_save is not None and \
                not set(self.modules_to_save.split(",")) <= {"embed_tokens", "lm_head"}:
            bad("--modules-to-save", f"must be embed_tokens and/or lm_head, not {self.modules_to_save!r}")
        if self.offload is not None and self.offload not in Offload.ALL:
            bad("--offload", f"must be none, optimizer or optimizer+params, not {self.offload!r}")
        if self.device is not None and self.device not in DEVICES:
            bad("--device", f"must be cuda, npu or cpu, not {self.device!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            bad("--workers", f"must be a non-negative integer, got {self.workers!r}")
        if self.attn not in ATTN_IMPLEMENTATIONS:
            bad("--attn", f"must be {' or '.join(ATTN_IMPLEMENTATIONS)}, not {self.attn!r}")
        if self.bnb_version is not None and not _VERSION.match(str(self.bnb_version)):
            bad("--bnb-version", f"must be a release number like 0.43.1, not {self.bnb_version!r}")
        if self.transformers_version is not None and not _VERSION.match(str(self.transformers_version)):
            bad("--transformers-version", f"must be a release number like 4.45.2, not {self.transformers_version!r}")
        if self.ds_buckets is not None:
            parse_ds_buckets(self.ds_buckets)
        if self.dataset is not None and not Path(self.dataset).is_file():
            bad("--dataset", f"no such file: {self.dataset}", "give the path of a LLaVA-format JSON file")
        if self.image_size is not None:
            from vramplan.plan.image_size import parse_image_size

            parse_image_size(self.image_size)
        if self.images is not None and not Path(self.images).is_dir():
            bad("--images", f"no such directory: {self.images}")


_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?([.+-]?[0-9A-Za-z]+)*$")


def parse_ds_buckets(text: str) -> tuple[int, int]:
    """--ds-buckets REDUCE,ALLGATHER: a DeepSpeed config's zero_optimization reduce_bucket_size and
    allgather_bucket_size in elements (5e8 or 500000000); "auto" (0 here) is what the HF Trainer fills in
    (reduce: hidden^2, transformers integrations/deepspeed.py)."""
    parts = [p.strip() for p in str(text).split(",")]
    out = []
    for p in parts:
        try:
            v = 0 if p == "auto" else float(p)
        except ValueError:
            v = -1
        if v < 0 or v != int(v) or (p != "auto" and v < 1):
            out = []
            break
        out.append(int(v))
    if len(out) != 2 or len(parts) != 2:
        raise UsageError(f"--ds-buckets: {text!r} is not REDUCE,ALLGATHER bucket sizes in elements",
                         "e.g. --ds-buckets auto,5e8 (LLaVA's scripts/zero2.json under the HF Trainer)")
    return out[0], out[1]


def version_tuple(v: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a release number such as 0.43.1 or 0.41.0.post2 (suffixes ignored)."""
    nums = [int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3]]
    return tuple((nums + [0, 0, 0])[:3])


def release(given: str | None, flag: str, package: str, pinned: str) -> tuple[str, str]:
    """(version, where it came from): the flag's, else the installed package's (metadata only), else the pinned."""
    from importlib.metadata import PackageNotFoundError, version

    if given:
        return given, flag
    try:
        return version(package), "installed"
    except PackageNotFoundError:
        return pinned, "not installed: the pinned version assumed"


# the string flags, by field: an empty value is refused (it would silently mean "not given")
STR_FLAGS = {"model": "--model", "recipe": "--recipe", "gpus": "--gpus", "dataset": "--dataset", "images": "--images",
             "image_size": "--image-size",
             "cpu_ram": "--cpu-ram", "disk": "--disk", "output_dir": "--output", "calibration": "--calibration",
             "bnb_version": "--bnb-version", "transformers_version": "--transformers-version",
             "ds_buckets": "--ds-buckets"}


# flags of training only: given with --task infer they would be silently ignored
TRAIN_ONLY = {"--samples": "samples", "--epochs": "epochs", "--micro-batch": "micro_batch",
              "--grad-accum": "grad_accum", "--global-batch": "global_batch", "--lora-r": "lora_r",
              "--save-steps": "save_steps", "--keep-checkpoints": "keep_checkpoints", "--zero": "zero",
              "--offload": "offload", "--grad-ckpt/--no-grad-ckpt": "grad_ckpt", "--bnb-version": "bnb_version",
              "--ds-buckets": "ds_buckets", "--pad-mask/--no-pad-mask": "pad_mask",
              "--kbit-embed-dtype": "kbit_embed_dtype"}


def options_from_kwargs(**kwargs) -> EstimateOptions:
    names = {f.name for f in fields(EstimateOptions)}
    return EstimateOptions(**{k: v for k, v in kwargs.items() if k in names and v is not None})
