"""Data movement of a training step: collectives between GPUs, offload over the host link, the CPU optimizer
(docs/estimate.md#time). Pure functions of the hardware profile, the parameter groups and the strategy.

Collectives (nccl-tests doc/PERFORMANCE.md): a ring all-gather or reduce-scatter of S bytes over N ranks moves
S x (N-1)/N through each rank's link; an all-reduce twice that. The link is the one the hardware really has:
NVLink/HCCS within a node, PCIe with or without peer-to-peer, and the NIC between nodes (the slowest hop of the
ring sets the pace).
"""

from __future__ import annotations

from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.priors import (
    COLLECTIVE_EFFICIENCY,
    CPU_ADAM_PARAMS_PER_S_PER_CORE,
    CPU_CORES_PER_GPU,
    INTERNODE_GBPS,
    PCIE_NO_P2P_FACTOR,
)
from vramplan.estimate.specs import HardwareSpec
from vramplan.estimate.types import Strategy, offloads_optimizer, offloads_params


def bus_bytes_per_s(hw: HardwareSpec, s: Strategy) -> tuple[float, str]:
    """(achieved bus bandwidth of a ring over the strategy's GPUs, what the link is)."""
    link, kind = hw.interconnect_gbps, hw.interconnect or "unknown"
    if kind.startswith("pcie") and not hw.gpu_p2p:
        link, kind = link * PCIE_NO_P2P_FACTOR, f"{kind} without peer-to-peer (through host RAM)"
    if s.nodes > 1:
        inter = hw.internode_gbps or INTERNODE_GBPS
        if inter < link:
            link, kind = inter, f"inter-node network ({inter:g} GB/s per GPU)"
    return link * 1e9 * COLLECTIVE_EFFICIENCY, kind


def weight_bytes(g: ParamGroups, compute_bytes: int) -> float:
    """Bytes of every weight as stored on the GPU: 4-bit storage for the quantized ones, 16-bit for the rest."""
    return g.quantized_bytes + (g.frozen_params + g.trainable) * compute_bytes


def collective_s_per_micro_step(hw: HardwareSpec, g: ParamGroups, s: Strategy, compute_bytes: int,
                                last_micro_step: bool) -> dict[str, float]:
    """Seconds of each collective in one micro-step (0 on one GPU).

    ZeRO-3 / FSDP full shard: all-gather every weight before forward and again before backward (the recompute
    runs inside backward with the gathered layer); gradients reduce-scattered every micro-step (DeepSpeed
    runtime/zero/stage3.py reduces in each backward; FSDP likewise). ZeRO-2: gradients reduce-scattered every
    micro-step (stage_1_and_2.py `reduce_ipg_grads` in each backward; ZeRO-1 at the last one) and the updated
    16-bit weights all-gathered after the step. Stage 0 (DDP): one all-reduce of the gradients at the last
    micro-step (no_sync before), bucketed during backward (torch DistributedDataParallel overlaps it)."""
    if s.gpus <= 1:
        return {}
    bw, _ = bus_bytes_per_s(hw, s)
    frac = (s.gpus - 1) / s.gpus
    grads = g.trainable * compute_bytes
    out = {}
    if s.zero_stage == 3:
        out["zero3_allgather"] = 2 * weight_bytes(g, compute_bytes) * frac / bw
    if s.zero_stage >= 2 or (s.zero_stage == 1 and last_micro_step):
        out["grad_reduce_scatter"] = grads * frac / bw
        if s.zero_stage < 3 and last_micro_step:
            out["param_allgather"] = grads * frac / bw
    elif last_micro_step:
        out["grad_allreduce"] = 2 * grads * frac / bw
    return out


def cpu_cores_per_node(s: Strategy, host_cores: int) -> int:
    per_node = max(1, s.gpus // max(1, s.nodes))
    return host_cores or CPU_CORES_PER_GPU * per_node


def offload_s(hw: HardwareSpec, g: ParamGroups, s: Strategy, compute_bytes: int, host_cores: int) -> dict:
    """Offload traffic and the CPU optimizer, per micro-step and per optimizer step.

    Optimizer offload (ZeRO-Offload, Ren et al. 2021, arXiv:2101.06840; DeepSpeed stage_1_and_2.py): each rank's
    gradient partition goes to pinned CPU memory every micro-step (`async_accumulate_grad_in_cpu_via_gpu` with
    gradient accumulation), the updated 16-bit weights come back after the step, and the CPU steps Adam for every
    rank of its node at cores x the per-core rate. Parameter offload (ZeRO-3): each rank uploads its weight
    partition before every gather (forward and backward)."""
    out = {"micro": 0.0, "step": 0.0, "cpu_adam": 0.0}
    host = hw.host_link_gbps * 1e9
    if offloads_optimizer(s.offload) and host:
        share = g.trainable / s.gpus
        out["micro"] += share * 4 / host  # fp32 gradient partition down
        out["step"] += share * compute_bytes / host  # updated 16-bit weights up
        per_node = max(1, s.gpus // max(1, s.nodes))
        rate = cpu_cores_per_node(s, host_cores) * CPU_ADAM_PARAMS_PER_S_PER_CORE
        out["cpu_adam"] = share * per_node / rate
    if offloads_params(s.offload) and host:
        out["micro"] += 2 * weight_bytes(g, compute_bytes) / s.gpus / host
    return out
