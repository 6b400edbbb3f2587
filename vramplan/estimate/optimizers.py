"""Optimizer kinds and where the training state lives: bytes per trainable parameter (docs/estimate.md#model-states).

Two engines run the step:
  deepspeed  DeepSpeed (runtime/engine.py `_configure_optimizer`) casts the module to bf16/fp16 and wraps the
             optimizer: ZeRO-0 with bf16 gets `FP16_Optimizer` (runtime/fp16/fused_optimizer.py, chosen by
             `_do_optimizer_sanity_check` as DDP_BFLOAT16), ZeRO-1/2 `DeepSpeedZeroOptimizer`
             (runtime/zero/stage_1_and_2.py), ZeRO-3 `DeepSpeedZeroOptimizer_Stage3` (runtime/zero/stage3.py).
             Every one keeps an fp32 master copy of the trainable weights and steps the inner optimizer on it.
  torch      plain PyTorch under the HF Trainer (no DeepSpeed config; DDP over several GPUs): the optimizer
             steps the trainable weights themselves, in their own dtype (`trainable_dtype`): fp32 for
             HF + PEFT (peft tuners_utils `_cast_adapter_dtype`, autocast_adapter_dtype=True), bf16 for
             "pure bf16" training (LitGPT --precision bf16-true, torchtune dtype=bf16). No master copy and
             no fp32 gradient copy.
Optimizer kinds (HF TrainingArguments `optim`):
  adamw_torch        exp_avg + exp_avg_sq in the dtype of the weights stepped (torch/optim/adam.py
                     `_init_group`: torch.zeros_like(p)): 8 B/param on fp32 weights, 4 B/param on bf16 weights
  paged_adamw_32bit  the same 32-bit states, in CUDA managed ("paged") memory (bitsandbytes
                     optim/optimizer.py `get_state_buffer` -> functional.py `get_paged`)
  adamw_8bit, paged_adamw_8bit
                     bitsandbytes 8-bit blockwise states (optim/optimizer.py Optimizer8bit `init_state`):
                     two uint8 states + one fp32 absmax per 256-element block each = 2 x (1 + 4/256) B/param;
                     tensors under `min_8bit_size` (4096 elements) keep 32-bit states
"""

from __future__ import annotations

DEEPSPEED, TORCH = "deepspeed", "torch"
ENGINES = (DEEPSPEED, TORCH)
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
EIGHT_BIT = ("adamw_8bit", "paged_adamw_8bit")
TRAINABLE_DTYPES = {"fp32": 4, "bf16": 2, "peft": 4}
# "peft": what HF Trainer + peft leave without DeepSpeed: the adapters (LoRA factors) upcast to fp32 (peft
# tuners_utils `cast_adapter_dtype`, autocast_adapter_dtype=True, only BaseTunerLayer adapters) and every other
# trained tensor (modules_to_save copies: embed_tokens, lm_head, the projector) in the model's dtype, because
# peft's ModulesToSaveWrapper deep-copies the original module (utils/other.py) and nothing casts it
KBIT_EMBED_DTYPES = ("fp32", "bf16")  # frozen embeddings + lm_head of k-bit training without DeepSpeed


def mean_trainable_bytes(trainable_dtype: str, trainable: int, adapters: int, compute_bytes: int) -> float:
    """Bytes per trainable parameter under plain PyTorch: the dtype's, or for "peft" fp32 adapters and 16-bit
    full copies (the mean over both, so that weights, grads and torch's states sum right)."""
    if trainable_dtype != "peft" or not trainable:
        return TRAINABLE_DTYPES[trainable_dtype]
    return (adapters * 4 + (trainable - adapters) * compute_bytes) / trainable
BNB_8BIT_BLOCK = 256  # bitsandbytes Optimizer8bit blockwise quantization: elements per fp32 absmax
DS_ALLREDUCE_BUCKET = 500_000_000  # runtime/engine.py allreduce_gradients: elements_per_buffer=500000000


PAGED = ("paged_adamw_8bit", "paged_adamw_32bit")


def state_bytes(optimizer: str, stepped_bytes: int) -> float:
    """Optimizer-state bytes per trainable parameter when the optimizer steps weights of `stepped_bytes`.
    bitsandbytes' 32-bit optimizers keep fp32 states whatever the weights' dtype (Optimizer2State
    `init_state`: dtype=torch.float32); torch's follow the weights."""
    if optimizer in EIGHT_BIT:
        return 2 * (1 + 4 / BNB_8BIT_BLOCK)
    if optimizer == "paged_adamw_32bit":
        return 8
    return 2 * stepped_bytes


def paged(optimizer: str) -> bool:
    """Paged states live in CUDA managed memory (cudaMallocManaged via bitsandbytes functional.py
    `get_paged`): outside torch's caching allocator (not in max_memory_allocated), and the driver
    evicts them to CPU RAM under memory pressure instead of failing (QLoRA arXiv:2305.14314 §3,
    "Paged Optimizers")."""
    return optimizer in PAGED


def describe(optimizer: str, stepped_bytes: int) -> str:
    if optimizer in EIGHT_BIT:
        return f"{optimizer}: 2 x (1 + 4/{BNB_8BIT_BLOCK}) B (bitsandbytes 8-bit blockwise m, v + absmax)"
    return f"{optimizer}: m + v x {stepped_bytes:.3g} B"
