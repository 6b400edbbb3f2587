"""CPU RAM and disk needs of a candidate (estimation-formulas.md F12, F13)."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.gpu_memory import ADAM_STATE_BYTES, FP32_GRAD_BYTES, MASTER_BYTES, Strategy
from vramplan.estimate.param_groups import ParamGroups
from vramplan.units import GiB

PROCESS_BASE_RSS = 3 * GiB  # python + torch + CUDA libs + transformers/peft/deepspeed per rank (prior)
CPU_PROCESS_BASE_RSS = 450 * 2**20  # the same without CUDA: measured here, the tiny-LLaVA trainer peaks at ~467 MiB RSS
HF_SHARD_BYTES = 5 * 10**9  # transformers save_pretrained default max_shard_size "5GB": loading holds ~1 shard
DEEPSPEED_CPU_FACTOR = 1.5  # DeepSpeed estimators' additional_buffer_factor for CPU-side states
WORKER_RSS = int(0.5 * GiB)  # one DataLoader worker (forked interpreter + image decode buffers), prior
CHECKPOINT_EXTRA_BYTES = 100 * 10**3  # scheduler.pt, rng_state, trainer_state.json, training_args, README,
#   MANIFEST: ~32 KB measured in the demo's checkpoints (more with DeepSpeed: `latest`, per-rank rng states)
LOG_BYTES = 50 * 10**6  # metrics.jsonl, summary.json, launch.sh, plan.json


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
               merge_export: bool = False, largest_shard_bytes: int = HF_SHARD_BYTES,
               device: str = "cuda") -> HostNeeds:
    T = g.trainable
    per_node = max(1, s.gpus // max(1, s.nodes))
    off_opt = s.offload in ("optimizer", "optimizer+params")
    off_par = s.offload == "optimizer+params"

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

    # One checkpoint (all ranks together): what HF Trainer + DeepSpeed write per save (F13; llava-recipes §3.1)
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
    if merge_export:
        disk["merged_export"] = g.total_params * 2
    return HostNeeds(cpu_total, cpu, sum(disk.values()), disk, ckpt_total, ckpt, pinned)
