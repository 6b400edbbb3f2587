"""CPU RAM, disk and checkpoint bytes of a candidate (docs/estimate.md#cpu-ram-and-disk).

CPU RAM per node: each rank's base RSS, one safetensors shard while loading, DataLoader workers, and
DeepSpeed's offloaded states (x its CPU buffer factor). One checkpoint is what the HF Trainer + DeepSpeed
write per save (transformers trainer.py `_save_checkpoint`; DeepSpeed engine `save_checkpoint`: module
states without frozen parameters when `exclude_frozen_parameters`, and one optimizer shard per rank).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.gpu_memory import ADAM_STATE_BYTES, FP32_GRAD_BYTES, MASTER_BYTES
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


def host_needs(g: ParamGroups, s: Strategy, *, compute_bytes: int, deepspeed: bool, base_weights_bytes: int,
               base_weights_on_disk: bool, dataset_bytes: int, keep_checkpoints: int, workers: int,
               largest_shard_bytes: int = HF_SHARD_BYTES,
               device: str = "cuda") -> HostNeeds:
    T = g.trainable
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
            "deepspeed_optimizer_shards": T * (MASTER_BYTES + ADAM_STATE_BYTES),  # *_optim_states.pt, all ranks
            "trainer_state": CHECKPOINT_EXTRA_BYTES,
        }
    else:
        ckpt = {
            "adapter_and_projector": T * 4,  # peft keeps adapters in fp32 without an engine cast
            "optimizer_pt": T * ADAM_STATE_BYTES,  # torch AdamW exp_avg + exp_avg_sq (fp32)
            "trainer_state": CHECKPOINT_EXTRA_BYTES,
        }
    ckpt_total = sum(ckpt.values())
    disk = {
        "base_weights": 0 if base_weights_on_disk else base_weights_bytes,
        "dataset": dataset_bytes,
        "checkpoints": ckpt_total * (keep_checkpoints + 1),  # keep-N plus the one being written
        "final_export": T * compute_bytes,
        "logs": LOG_BYTES,
    }
    return HostNeeds(cpu_total, cpu, sum(disk.values()), disk, ckpt_total, ckpt, pinned)
