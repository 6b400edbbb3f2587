"""CPU RAM, disk and checkpoint bytes of a candidate (docs/estimate.md#cpu-ram-and-disk).

CPU RAM per node: each rank's base RSS, one safetensors shard while loading, DataLoader workers, and
DeepSpeed's offloaded states (x its CPU buffer factor). One checkpoint is what the HF Trainer + DeepSpeed
write per save (transformers trainer.py `_save_checkpoint`; DeepSpeed engine `save_checkpoint`: module
states without frozen parameters when `exclude_frozen_parameters`, and one optimizer shard per rank).
Disk counts what the run will write; files already on this machine (a local model dir, a --dataset) are
reported in `disk_present` but not counted, and every part names its source (`disk_sources`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.estimate.gpu_memory import ADAM_STATE_BYTES, FP32_GRAD_BYTES, MASTER_BYTES
from vramplan.estimate.optimizers import state_bytes
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.priors import (
    CHECKPOINT_EXTRA_BYTES,
    CPU_PROCESS_BASE_RSS,
    DEEPSPEED_CPU_FACTOR,
    HF_SHARD_BYTES,
    LOG_BYTES,
    PROCESS_BASE_RSS,
    WORKER_RSS,
)
from vramplan.estimate.types import Strategy, offloads_optimizer, offloads_params


@dataclass(frozen=True)
class HostNeeds:
    cpu_ram_bytes: int  # per node
    cpu_breakdown: dict
    disk_bytes: int
    disk_breakdown: dict
    checkpoint_bytes: int
    checkpoint_breakdown: dict
    pinned_bytes: int  # page-locked memory per node (offload): compare with `ulimit -l`
    disk_sources: dict = field(default_factory=dict)  # part -> measured | scaled | assumed | computed
    disk_present: dict = field(default_factory=dict)  # part -> bytes already on this machine (not counted)
    checkpoint_saves: int | None = None  # saves the run makes (None: step count unknown)
    checkpoints_on_disk: int = 0  # checkpoints on disk at once, at most


def trainer_steps(samples: int, epochs: int, global_batch: int) -> int:
    """Optimizer steps of the HF Trainer: epochs x ceil(samples / global batch) (transformers trainer.py
    `set_initial_training_values`: max_steps = ceil(epochs x update steps per epoch), the last partial batch kept)."""
    return max(1, epochs * -(-samples // max(1, global_batch)))


def checkpoint_saves(steps: int, save_steps: int) -> int:
    """Saves the trainer makes: one every `save_steps` optimizer steps, plus one at the last step when that
    is not a multiple of `save_steps` (transformers trainer_callback.py `DefaultFlowCallback.on_step_end`:
    save_strategy "steps" also saves at max_steps). final/ is written on top (`final_export`)."""
    return -(-steps // max(1, save_steps))


def checkpoints_on_disk(keep: int, saves: int | None) -> int:
    """Checkpoints on disk at once: keep-N plus the one being written (train/engine.py prunes only after the
    new one is verified), but never more than the run saves."""
    return keep + 1 if saves is None else max(1, min(keep + 1, saves))


def host_needs(g: ParamGroups, s: Strategy, *, compute_bytes: int, deepspeed: bool, base_weights_bytes: int,
               base_weights_on_disk: bool, dataset_bytes: int, keep_checkpoints: int, workers: int,
               largest_shard_bytes: int = HF_SHARD_BYTES,
               device: str = "cuda", dataset_on_disk: bool = False, dataset_source: str = "assumed",
               weights_source: str = "assumed", steps: int | None = None,
               save_steps: int | None = None, optimizer: str = "adamw_torch",
               trainable_bytes: float = 4) -> HostNeeds:
    """`steps` and `save_steps` (both given) bound the checkpoints by the saves the run makes; without
    them keep-N + 1 are counted. `*_source` name where the dataset / base-weight sizes came from."""
    T = g.trainable
    ds_states = state_bytes(optimizer, MASTER_BYTES)  # on DeepSpeed's fp32 master (optimizers.py)
    per_node = max(1, s.gpus // max(1, s.nodes))
    off_opt = offloads_optimizer(s.offload)
    off_par = offloads_params(s.offload)

    cpu = {
        "processes": per_node * (CPU_PROCESS_BASE_RSS if device == "cpu" else PROCESS_BASE_RSS),
        "model_loading": per_node * min(largest_shard_bytes, base_weights_bytes),
        "dataloader_workers": per_node * workers * WORKER_RSS,
    }
    pinned = 0
    if off_opt:
        # fp32 master + m + v + fp32 grads, partitioned over all ranks; this node holds its ranks' share
        states = T * (MASTER_BYTES + ADAM_STATE_BYTES + FP32_GRAD_BYTES) * per_node / s.gpus
        cpu["offloaded_optimizer"] = int(states * DEEPSPEED_CPU_FACTOR)
        pinned += int(states)
    if off_par:
        params = (g.quantized_bytes + (g.frozen_params + T) * compute_bytes) * per_node / s.gpus
        cpu["offloaded_params"] = int(params * DEEPSPEED_CPU_FACTOR)
        pinned += int(params)
    cpu_total = sum(cpu.values())

    # One checkpoint (all ranks together): what HF Trainer + DeepSpeed write per save
    if deepspeed:
        ckpt = {
            "adapter_and_projector": T * compute_bytes,  # adapter_model.safetensors (+ projector) in bf16
            "deepspeed_model_states": T * compute_bytes,  # mp_rank_00_model_states.pt, frozen params excluded
            "deepspeed_optimizer_shards": int(T * (MASTER_BYTES + ds_states)),  # *_optim_states.pt, all ranks
            "trainer_state": CHECKPOINT_EXTRA_BYTES,
        }
    else:
        ckpt = {
            "adapter_and_projector": int(T * trainable_bytes),  # the trainable weights as trained (no engine cast)
            "optimizer_pt": int(T * state_bytes(optimizer, trainable_bytes)),  # optimizer.pt: m + v (optimizers.py)
            "trainer_state": CHECKPOINT_EXTRA_BYTES,
        }
    ckpt_total = sum(ckpt.values())
    saves = checkpoint_saves(steps, save_steps) if steps and save_steps else None
    at_once = checkpoints_on_disk(keep_checkpoints, saves)
    disk = {
        "base_weights": 0 if base_weights_on_disk else base_weights_bytes,
        "dataset": 0 if dataset_on_disk else dataset_bytes,
        "checkpoints": ckpt_total * at_once,
        "final_export": T * compute_bytes,
        "logs": LOG_BYTES,
    }
    sources = {"base_weights": weights_source, "dataset": dataset_source, "checkpoints": "computed",
               "final_export": "computed", "logs": "assumed"}
    present = {k: v for k, v in (("base_weights", base_weights_bytes if base_weights_on_disk else 0),
                                 ("dataset", dataset_bytes if dataset_on_disk else 0)) if v}
    return HostNeeds(cpu_total, cpu, sum(disk.values()), disk, ckpt_total, ckpt, pinned, sources, present,
                     saves, at_once)
