"""The estimate's flags as one validated request (EstimateOptions); errors name the flag."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from vramplan.errors import UsageError
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
    workers: int = 0  # --workers: DataLoader worker processes per rank (each costs CPU RAM, speeds up image decoding)
    attn: str = "sdpa"  # --attn sdpa|eager|flash: eager saves the attention probabilities (much more memory)
    speed_tolerance: float = SPEED_TOLERANCE  # --speed-tolerance: the pick's time window, a fraction

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
        if isinstance(self.speed_tolerance, bool) or not isinstance(self.speed_tolerance, (int, float)) \
                or not 0 <= self.speed_tolerance <= 1:
            bad("--speed-tolerance", f"must be a fraction in [0, 1], got {self.speed_tolerance!r}",
                "e.g. --speed-tolerance 0.1 for 10%")
        if self.quant is not None and self.quant not in Quant.ALL:
            bad("--quant", f"must be nf4, int8 or none, not {self.quant!r}")
        if self.zero is not None and self.zero not in ZERO_STAGES:
            bad("--zero", f"must be 0, 1, 2 or 3, not {self.zero}")
        if self.offload is not None and self.offload not in Offload.ALL:
            bad("--offload", f"must be none, optimizer or optimizer+params, not {self.offload!r}")
        if self.device is not None and self.device not in DEVICES:
            bad("--device", f"must be cuda, npu or cpu, not {self.device!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            bad("--workers", f"must be a non-negative integer, got {self.workers!r}")
        if self.attn not in ATTN_IMPLEMENTATIONS:
            bad("--attn", f"must be {' or '.join(ATTN_IMPLEMENTATIONS)}, not {self.attn!r}")
        if self.dataset is not None and not Path(self.dataset).is_file():
            bad("--dataset", f"no such file: {self.dataset}", "give the path of a LLaVA-format JSON file")
        if self.images is not None and not Path(self.images).is_dir():
            bad("--images", f"no such directory: {self.images}")


def options_from_kwargs(**kwargs) -> EstimateOptions:
    names = {f.name for f in fields(EstimateOptions)}
    return EstimateOptions(**{k: v for k, v in kwargs.items() if k in names and v is not None})
