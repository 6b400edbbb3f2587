"""The estimate's vocabulary: strategies, the job, a candidate, and the allowed values of each knob."""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.estimate.specs import HardwareSpec, ModelSpec, RecipeSpec


class Offload:
    """What DeepSpeed moves to CPU RAM (zero_optimization.offload_optimizer / offload_param)."""

    NONE = "none"
    OPTIMIZER = "optimizer"  # fp32 master + Adam states + fp32 grads in pinned CPU RAM; CPU Adam steps
    PARAMS = "optimizer+params"  # ZeRO-3 only: the weights too
    ALL = (NONE, OPTIMIZER, PARAMS)
    SHORT = {NONE: "-", OPTIMIZER: "opt", PARAMS: "opt+param"}
    BY_STAGE = {0: (NONE,), 1: (NONE, OPTIMIZER), 2: (NONE, OPTIMIZER), 3: (NONE, OPTIMIZER, PARAMS)}


def offloads_optimizer(offload: str) -> bool:
    return offload in (Offload.OPTIMIZER, Offload.PARAMS)


def offloads_params(offload: str) -> bool:
    return offload == Offload.PARAMS


class Quant:
    """How the LLM's Linear weights are stored."""

    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat (QLoRA)
    INT8 = "int8"  # bitsandbytes LLM.int8
    NONE = "none"
    ALL = (NF4, INT8, NONE)
    KBIT = (NF4, INT8)


ZERO_STAGES = (0, 1, 2, 3)
DEVICES = ("cuda", "npu", "cpu")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash")  # flash: transformers "flash_attention_2"
COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
SPEED_TOLERANCE = 0.10  # default --speed-tolerance: the pick's time window (docs/estimate.md#the-pick)


@dataclass(frozen=True)
class Strategy:
    """The parallel layout of one candidate."""

    zero_stage: int  # 0..3
    offload: str  # Offload.*
    gpus: int  # data-parallel world size
    nodes: int
    micro_batch: int
    grad_accum: int
    grad_ckpt: bool
    engine: str = "deepspeed"  # optimizers.DEEPSPEED | optimizers.TORCH (plain PyTorch, no ds_config)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.gpus


@dataclass(frozen=True)
class DsBuckets:
    """The bucket sizes (elements) of the DeepSpeed config vramplan writes (ds_config.py)."""

    reduce_bucket: int
    allgather_bucket: int
    overlap_comm: bool
    stage3_prefetch_bucket: int
    stage3_max_live_parameters: int


@dataclass(frozen=True)
class Job:
    """Everything about the run except the parallel strategy (built by vramplan.plan.resolve)."""

    model: ModelSpec
    recipe: RecipeSpec
    hardware: HardwareSpec
    nodes: int
    gpus_per_node: int
    seq_len: int  # LLM tokens per sample incl. image tokens (memory: the longest sample sets the peak)
    images_per_sample: float
    samples: int
    epochs: int
    compute_dtype: str
    quant: str
    headroom: float  # fraction of device memory kept free
    device: str = "cuda"
    attn: str = "sdpa"  # attention implementation (--attn sdpa|eager|flash): eager saves the attention probabilities
    # bitsandbytes' MatMul4Bit keeps each 4-bit Linear's input for backward (releases before
    # priors.BNB_DROPS_KBIT_INPUT; set by vramplan.plan.resolve from the installed version or --bnb-version)
    kbit_saves_inputs: bool = False
    # a micro-batch of 2+ samples is right-padded to its longest (train/data.py collate), so SDPA gets an explicit
    # mask in every layer (activations.py padding_mask_bytes_per_token); False when --dataset's records are all
    # one length
    padded_batches: bool = True
    # (reduce, allgather) bucket elements of a DeepSpeed config the user gives (--ds-buckets; 0 = "auto",
    # which the HF Trainer fills with hidden^2); () = vramplan's own (ds_config.buckets_for)
    ds_buckets: tuple[int, ...] = ()
    cpu_ram_bytes: int | None = None  # per node, when known
    cpu_cores: int = 0  # physical cores per node, when the plan is for this host (CPU Adam); 0 = the prior
    disk_free_bytes: int | None = None
    dataset_bytes: int = 0
    base_weights_on_disk: bool = False
    dataset_on_disk: bool = False  # --dataset: its files are already on this machine (not counted as new disk)
    dataset_source: str = "assumed"  # measured (--dataset) | scaled (--samples) | assumed (the recipe's default)
    workers: int = 0  # DataLoader workers per rank (--workers)
    micro_batches: tuple[int, ...] = ()  # fixed by --micro-batch, else searched
    grad_accum: int | None = None  # fixed by --grad-accum
    grad_ckpt: tuple[bool, ...] = (True, False)
    zero_stages: tuple[int, ...] = ZERO_STAGES
    engines: tuple[str, ...] = ("deepspeed", "torch")  # --zero none: plain PyTorch only; --zero N: DeepSpeed only
    offloads: tuple[str, ...] = Offload.ALL
    mean_seq_len: int = 0  # mean tokens per sample for the time estimate; 0 = seq_len
    calibration: tuple = ()  # ((component, factor), ...) from `vramplan calibrate --write`
    speed_tolerance: float = SPEED_TOLERANCE  # --speed-tolerance

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def compute_bytes(self) -> int:
        return COMPUTE_BYTES[self.compute_dtype]


@dataclass
class Candidate:
    """One evaluated strategy: every number the estimate prints for it, split into named components."""

    strategy: Strategy
    fits: bool
    reasons: list[str]
    notes: list[str]
    vram_per_gpu_bytes: int
    vram_allocated_per_gpu_bytes: int
    vram_breakdown: dict
    vram_formulas: dict
    peak_phase: str
    cpu_ram_bytes: int
    cpu_breakdown: dict
    pinned_bytes: int
    disk_bytes: int
    disk_breakdown: dict
    checkpoint_bytes: int
    checkpoint_breakdown: dict
    time_seconds: float
    time_detail: dict
    ds_config: dict | None
    compatible: bool = True
    dtype: str | None = None  # --task infer: the weights' dtype (bf16, fp16, fp32, int8, nf4)
    vram_total_bytes: int | None = None  # --task infer: nvidia-smi summed over the GPUs in use
    disk_sources: dict = field(default_factory=dict)  # disk part -> measured | scaled | assumed | computed
    disk_present: dict = field(default_factory=dict)  # disk part -> bytes already on this machine (not counted)
    checkpoint_saves: int | None = None  # saves the run makes
    checkpoints_on_disk: int = 0  # checkpoints on disk at once, at most
    margin_bytes: int | None = None  # usable GPU memory (card minus headroom) minus the nvidia-smi figure, per GPU
    margin_fraction: float | None = None  # margin_bytes / the card's memory

    def to_dict(self) -> dict:
        s = self.strategy
        infer = {} if self.dtype is None else {"dtype": self.dtype, "vram_total_bytes": self.vram_total_bytes}
        return {
            "zero_stage": s.zero_stage,
            "engine": s.engine,
            "offload": s.offload,
            "gpus": s.gpus,
            "nodes": s.nodes,
            "micro_batch": s.micro_batch,
            "grad_accum": s.grad_accum,
            "global_batch": s.global_batch,
            "grad_checkpointing": s.grad_ckpt,
            "fits": self.fits,
            "compatible": self.compatible,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "vram_per_gpu_bytes": self.vram_per_gpu_bytes,
            "vram_allocated_per_gpu_bytes": self.vram_allocated_per_gpu_bytes,
            "vram_breakdown": dict(self.vram_breakdown),
            "vram_formulas": dict(self.vram_formulas),
            "peak_phase": self.peak_phase,
            "cpu_ram_bytes": self.cpu_ram_bytes,
            "cpu_breakdown": dict(self.cpu_breakdown),
            "pinned_cpu_bytes": self.pinned_bytes,
            "disk_bytes": self.disk_bytes,
            "disk_breakdown": dict(self.disk_breakdown),
            "disk_sources": dict(self.disk_sources),
            "disk_present": dict(self.disk_present),
            "checkpoint_saves": self.checkpoint_saves,
            "checkpoints_on_disk": self.checkpoints_on_disk,
            "checkpoint_bytes": self.checkpoint_bytes,
            "checkpoint_breakdown": dict(self.checkpoint_breakdown),
            "time_seconds": self.time_seconds,
            "time_detail": dict(self.time_detail),
            "ds_config": self.ds_config,
            "margin_bytes": self.margin_bytes,
            "margin_fraction": self.margin_fraction,
            **infer,
        }
