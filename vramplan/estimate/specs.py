"""Typed, frozen descriptions of what the estimate needs: model, hardware, recipe.

These are filled from profile TOML files (`vramplan.inputs.profiles`) or from a local Hugging Face
model dir (`vramplan.inputs.model_dir`). Sizes are element counts; bytes are computed by the
estimate modules. Keys carry their unit where they have one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.contract import LoraSpec

# The family configs live with their family (vramplan/estimate/families/); re-exported for callers.
from vramplan.estimate.families.clip import VisionSpec
from vramplan.estimate.families.llama import TextSpec
from vramplan.estimate.families.llava import ProjectorSpec

__all__ = ["HardwareSpec", "LoraSpec", "ModelSpec", "ProjectorSpec", "RecipeSpec", "TextSpec", "VisionSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """A model: a text family's LLM + (optional) a vision family's tower + a projector (families/).

    `stored_bytes_by_dtype` and `stored_total_bytes` are exact when read from safetensors
    headers of a local dir; for built-in profiles they are derived from parameter counts.
    """

    name: str
    source: str
    text: TextSpec  # any text family's spec
    vision: VisionSpec | None  # any vision family's spec
    projector: ProjectorSpec | None
    stored_dtype: str = "bf16"  # dtype of the weights on disk / in the HF cache
    chat_template: str = "llama3"  # "llama3" | "vicuna_v1"
    hf_ids: dict = field(default_factory=dict)  # {"llm": ..., "vision": ...}
    path: str | None = None  # local HF dir, when estimated from one
    stored_total_bytes: int | None = None  # exact, from safetensors headers, when known
    stored_bytes_by_dtype: dict = field(default_factory=dict)
    image_token_added: bool = True  # an <image> token is added to the vocab (HF LLaVA); XTuner adds none
    image_size: tuple[int, int] | None = None  # (height, width) of the planned images; None = the processor's default

    @property
    def family(self) -> str:
        """The family modules that describe it: "mistral", or "llava: llama + clip" for a VLM."""
        if self.vision is None:
            return self.text.family
        return f"{self.projector.family if self.projector else 'vlm'}: {self.text.family} + {self.vision.family}"

    def _tokens(self, projector_fn: str, vision_fn: str) -> int:
        """Tokens per image from the projector family's `projector_fn(p, v, image_size)` (the seam,
        vramplan/estimate/families/__init__.py), else the vision family's `vision_fn(v)`; 0 without a tower."""
        if self.vision is None:
            return 0
        from vramplan.estimate.families import module_for

        proj = module_for(self.projector) if self.projector is not None else None
        if proj is not None and hasattr(proj, projector_fn):
            return int(getattr(proj, projector_fn)(self.projector, self.vision, self.image_size))
        return int(getattr(module_for(self.vision), vision_fn)(self.vision))

    @property
    def image_tokens(self) -> int:
        """LLM tokens per image (its place in the sequence) at `image_size`."""
        return self._tokens("llm_tokens_per_image", "image_tokens")

    @property
    def tower_tokens(self) -> int:
        """Tokens the vision tower processes per image at `image_size` (every crop or tile, CLS included)."""
        return self._tokens("tower_tokens_per_image", "tokens_per_image")

    @property
    def projector_tokens(self) -> int:
        """Tokens the projector maps per image (before any unpadding or pooling): the family's
        projector_tokens_per_image where it differs from the LLM's tokens, else those."""
        if self.projector is not None and self.vision is not None:
            from vramplan.estimate.families import module_for

            proj = module_for(self.projector)
            if hasattr(proj, "projector_tokens_per_image"):
                return int(proj.projector_tokens_per_image(self.projector, self.vision, self.image_size))
        return self.image_tokens

    @property
    def default_image_size(self) -> tuple[int, int] | None:
        """The image size the family plans for when none is given (its processor's), where it names one."""
        if self.vision is None or self.projector is None:
            return None
        from vramplan.estimate.families import module_for

        fn = getattr(module_for(self.projector), "default_image_size", None)
        return tuple(fn(self.projector, self.vision)) if fn else None


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator SKU. Memory is what the device reports as total, in GiB (2**30 B)."""

    name: str
    source: str
    vendor: str  # "nvidia" | "ascend"
    display_name: str
    memory_gib: float  # total device memory as reported by nvidia-smi / npu-smi
    marketed_memory_gb: int  # the "24 GB" on the box; what `--gpus 1x24G` matches
    bf16_tflops: float  # dense peak, tensor cores
    fp16_tflops: float
    bf16_supported: bool
    hbm_bandwidth_gbps: float  # GB/s (1e9)
    host_link_gbps: float  # GB/s one direction (PCIe / host link), bounds offload traffic
    interconnect: str  # "pcie4" | "nvlink3" | "hccs" ...
    interconnect_gbps: float  # GB/s one direction, GPU-to-GPU
    compute_capability: str = ""  # "8.0"; "" for non-NVIDIA
    bnb_4bit_supported: bool = True  # bitsandbytes NF4 kernels exist for this device
    pcie_generation: int = 0  # of the host link (3, 4, 5); 0 = unknown
    gpu_p2p: bool = True  # GPUs exchange data directly (NVLink, HCCS, PCIe P2P); False: NCCL stages through host RAM
    internode_gbps: float = 0.0  # GB/s one direction per GPU between nodes (NIC); 0 = the prior (priors.py)
    sm_count: int = 0  # streaming multiprocessors (attention decode parallelism); 0 = unknown

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


@dataclass(frozen=True)
class RecipeSpec:
    """A training recipe (profiles/recipes/*.toml); every field is overridable by a flag."""

    name: str
    source: str
    description: str
    quant: str  # "nf4" | "int8" | "none"
    double_quant: bool
    compute_dtype: str  # "bf16" | "fp16"
    llm_lora: LoraSpec | None
    vision_lora: LoraSpec | None
    train_projector: bool
    train_llm_full: bool
    learning_rate: float
    epochs: int
    micro_batch: int
    global_batch: int  # per optimizer step, over all GPUs (micro x accum x gpus)
    max_length: int  # LLM tokens incl. image tokens
    text_tokens: int  # text tokens per sample the recipe assumes (<= max_length - image tokens)
    gradient_checkpointing: bool
    save_steps: int
    keep_checkpoints: int
    optimizer: str = "adamw_torch"  # HF `optim`: adamw_torch | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit
    trainable_dtype: str = "fp32"  # plain PyTorch: the trainable weights' dtype (bf16 = "pure bf16" training)
    modules_to_save: tuple[str, ...] = ()  # peft modules_to_save: "embed_tokens", "lm_head" trained in full
    # k-bit without DeepSpeed: the frozen embeddings + lm_head after prepare_model_for_kbit_training: fp32 (peft
    # alone) or bf16 (cast back, as TRL and qlora.py do under bf16): less memory, no per-step lm_head copy
    kbit_embed_dtype: str = "fp32"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    samples: int = 0  # default dataset size when no --dataset/--samples
    dataset_bytes: int = 0  # default dataset size on disk (JSON + images)
