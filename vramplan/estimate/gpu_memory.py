"""Per-GPU peak memory for one candidate: ZeRO stage x offload x GPU count x micro-batch x checkpointing.

Phase model (llm-analysis, vramcalc; docs/estimate.md#peak-and-overheads):
    peak_allocated = persistent + max(train-step transient, optimizer-step transient, load transient)
    nvidia_smi     = peak_allocated * ALLOCATOR_RESERVE_FACTOR + CUDA context (+ NCCL per rank if >1 GPU)
Persistent model states follow the ZeRO paper (Rajbhandari et al. 2019, arXiv:1910.02054 §5) and
DeepSpeed's estimators (runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs, stage3.py
estimate_zero3_model_states_mem_needs), per parameter group: frozen weights are replicated under stages
0-2 and partitioned under 3 (docs/estimate.md#model-states). Under DeepSpeed with bf16/fp16 the engine casts
the whole module to the 16-bit dtype (runtime/engine.py `_configure_distributed_model`: module.bfloat16()),
so every non-quantized weight is 16-bit on the GPU and trainable ones get an fp32 master copy. The fp32
gradients DeepSpeed's optimizer wrappers step on exist only inside step() (the optimizer-step phase), and a
plain-PyTorch candidate (Strategy.engine "torch") has no master copy at all (vramplan/estimate/optimizers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.estimate.activations import LOGIT_FORWARD_BYTES, LOGIT_PEAK_BYTES, ActivationBreakdown
from vramplan.estimate.ds_config import SUB_GROUP_SIZE
from vramplan.estimate.optimizers import DS_ALLREDUCE_BUCKET, EIGHT_BIT, TORCH, describe, paged, state_bytes
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.priors import (
    ALLOCATOR_RESERVE_FACTOR,
    CPU_PROCESS_BASE_RSS,
    CUDA_CONTEXT_BYTES,
    NCCL_BYTES_PER_RANK,
)
from vramplan.estimate.types import DsBuckets, Quant, Strategy, offloads_optimizer, offloads_params

ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq (adamw_torch on fp32 weights; optimizers.py for the others)
MASTER_BYTES = 4  # fp32 master weights (DeepSpeed's optimizer wrappers)
FP32_GRAD_BYTES = 4  # fp32 gradients the DeepSpeed optimizer steps on: made inside step(), not kept (see
#   _optimizer_states); DeepSpeed's estimate_zero2 charges them as 4 of its 18 B/param (runtime/zero/stage_1_and_2.py)

HEAD_CAST = " + the frozen fp32 lm_head's 16-bit autocast copy (peft prepare_model_for_kbit_training)"
ZERO_SOURCE = "ZeRO paper §5 (arXiv:1910.02054); DeepSpeed estimate_zero2/3_model_states_mem_needs"


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    kind: str  # "persistent" | "transient" | "overhead" | "paged" (CUDA managed memory, not in the peak)
    formula: str
    source: str


@dataclass
class GpuMemory:
    components: list[Component] = field(default_factory=list)
    peak_allocated: int = 0
    nvidia_smi: int = 0
    peak_phase: str = ""

    def as_dict(self) -> dict[str, int]:
        return {c.name: c.bytes for c in self.components}


def _div(x: float, n: int) -> int:
    return int(-(-x // n)) if n > 1 else int(x)


def _weights(g: ParamGroups, s: Strategy, bc: int, quant: str, trainable_bytes: float = 4,
             frozen_16bit: int = 0) -> list[Component]:
    n, part_w, off_par = s.gpus, s.zero_stage == 3, offloads_params(s.offload)
    plain = s.engine == TORCH
    out = []
    if g.quantized_bytes:
        qb = 0 if off_par else (_div(g.quantized_bytes, n) if part_w else g.quantized_bytes)
        out.append(Component(
            "weights_quantized", int(qb), "persistent",
            f"{quant} storage incl. quant state" + (" / GPUs (ZeRO-3 partitions it)" if part_w else "")
            + (" -> CPU (offload params)" if off_par else ""),
            "QLoRA arXiv:2305.14314 §3; bitsandbytes quantize_4bit (blocksize 64, nested 256)"))
    # Without DeepSpeed nothing casts the module back to 16 bit after peft's prepare_model_for_kbit_training
    # upcast every non-quantized weight to fp32 (peft utils/other.py), so with k-bit weights they stay fp32.
    # TRL's SFTTrainer and qlora.py cast the frozen embeddings and lm_head back to bf16 (`frozen_16bit` of them)
    fbytes = 4 if plain and g.quantized_bytes else bc
    back = frozen_16bit if fbytes != bc else 0
    fb = (g.frozen_params - back) * fbytes + back * bc
    out.append(Component("weights_frozen", 0 if off_par else (_div(fb, n) if part_w else fb), "persistent",
                         f"frozen params x {fbytes} B"
                         + (" (fp32: prepare_model_for_kbit_training, no engine cast)" if fbytes != bc
                            else " (module cast to the compute dtype)")
                         + (f", the embeddings + lm_head ({back:,}) x {bc} B: cast back (TRL "
                            "peft_module_casting_to_bf16, qlora.py)" if back else "")
                         + (" / GPUs" if part_w else " (replicated)"),
                         ZERO_SOURCE + ("; trl trainer/utils.py peft_module_casting_to_bf16" if back else "")))
    T, tb = g.trainable, (trainable_bytes if plain else bc)
    out.append(Component("weights_trainable", 0 if off_par else int(_div(T * tb, n) if part_w else T * tb),
                         "persistent", f"trainable params x {tb:.3g} B" + (" / GPUs" if part_w else "")
                         + (" (plain PyTorch: the weights the optimizer steps)" if plain else ""), ZERO_SOURCE))
    return out


def _optimizer_states(g: ParamGroups, s: Strategy, bc: int, optimizer: str = "adamw_torch",
                      trainable_bytes: float = 4) -> list[Component]:
    """Gradients, optimizer states (+ DeepSpeed's fp32 master) and the step's transient fp32 gradients.

    plain PyTorch: grads and states in the trainable dtype, nothing else (torch/optim/adam.py); the foreach
    AdamW makes one state-sized temporary (`torch._foreach_sqrt(exp_avg_sqs)` in `_multi_tensor_adam`).
    DeepSpeed 0.19 (the pinned version), read from its code:
      ZeRO-0  FP16_Optimizer (runtime/fp16/fused_optimizer.py): flat fp32 master + states; 16-bit grads live
              on the params; `step()` makes an fp32 copy of every grad and flattens them
              (`_flatten_dense_tensors([p.grad.to(fp32)])`): 8 B/param at once while the 16-bit grads live.
      ZeRO-1/2 DeepSpeedZeroOptimizer (runtime/zero/stage_1_and_2.py): fp32 partition + states / GPUs; the
              averaged 16-bit grads (ZeRO-1 all, ZeRO-2 its partition); `step()` flattens the partition
              (2 B) and casts it to fp32 (`single_grad_partition`, 4 B): 6 B/param / GPUs, freed after.
      ZeRO-3  DeepSpeedZeroOptimizer_Stage3 (runtime/zero/stage3.py): `grad_partitions_flat_buffer` 16-bit /
              GPUs, persistent; `_prepare_fp32_grad_for_sub_group` flattens + casts per sub-group (6 B / GPUs).
      offload_optimizer: master, states and fp32 grads live in CPU RAM; nothing of the step on the GPU.
    """
    n, z, T, off_opt = s.gpus, s.zero_stage, g.trainable, offloads_optimizer(s.offload)
    if s.engine == TORCH:
        tb = trainable_bytes
        st = state_bytes(optimizer, tb)
        tmp = T * tb if optimizer not in EIGHT_BIT else 0
        pg = paged(optimizer)
        return [
            Component("gradients", int(T * tb), "persistent", f"trainable x {tb:.3g} B (grads in the weights' dtype)",
                      "torch autograd; transformers Trainer without DeepSpeed"),
            Component("optimizer_states_paged" if pg else "optimizer_states", int(T * st), "paged" if pg else
                      "persistent", describe(optimizer, tb) + " on the trainable weights (no master copy)"
                      + ("; paged: CUDA managed memory, outside torch's allocator, evicted to CPU RAM under "
                         "pressure, so not in the peak" if pg else ""),
                      "torch/optim/adam.py; bitsandbytes optim/optimizer.py; docs/estimate.md#model-states"),
            Component("optimizer_step_transient", int(tmp), "transient",
                      "foreach AdamW: one state-sized temporary (sqrt of exp_avg_sq)" if tmp else
                      "bitsandbytes 8-bit step: a fused kernel, no temporary",
                      "torch/optim/adam.py _multi_tensor_adam"),
        ]
    st = state_bytes(optimizer, MASTER_BYTES)
    if off_opt:
        grads, gform = 0, "reduced into pinned CPU buffers (offload_optimizer)"
    elif z >= 2:
        grads, gform = _div(T * bc, n), f"trainable x {bc} B / GPUs (averaged gradient partition)"
    else:
        grads, gform = T * bc, f"trainable x {bc} B (full 16-bit gradients under ZeRO 0-1)"
    if off_opt:
        opt, oform = 0, "fp32 master + Adam m, v live in CPU RAM (offload_optimizer)"
    else:
        opt = _div(T * (MASTER_BYTES + st), n) if z >= 1 else int(T * (MASTER_BYTES + st))
        oform = (f"trainable x (4 fp32 master + {describe(optimizer, MASTER_BYTES)})"
                 + (" / GPUs" if z >= 1 else " (ZeRO-0: FP16_Optimizer, not partitioned)"))
    if off_opt:
        step, sform = 0, "the step runs on the CPU (offload_optimizer)"
    elif z == 0:
        # before step() the engine all-reduces the grads through flat buckets of up to 5e8 elements, even on
        # one GPU (runtime/engine.py allreduce_gradients -> buffered_allreduce_fallback); freed before step()
        step = max(T * 2 * FP32_GRAD_BYTES, min(T, DS_ALLREDUCE_BUCKET) * bc)
        sform = ("fp32 copy of every grad + their flattened copy, inside FP16_Optimizer.step() (larger than the "
                 "engine's 5e8-element all-reduce bucket before it)")
    elif z == 3:
        step = min(_div(T, n), SUB_GROUP_SIZE) * (bc + FP32_GRAD_BYTES)
        sform = (f"flattened {bc} B grads + their fp32 cast of one sub-group (sub_group_size "
                 f"{SUB_GROUP_SIZE:.0e} elements) of this GPU's partition, inside step()")
    else:
        step = _div(T * (bc + FP32_GRAD_BYTES), n)
        sform = f"flattened {bc} B grad partition + its fp32 cast, inside step() / GPUs"
    return [
        Component("gradients", int(grads), "persistent", gform, ZERO_SOURCE),
        Component("optimizer_states", int(opt), "persistent", oform, ZERO_SOURCE + "; docs/estimate.md#model-states"),
        Component("optimizer_step_transient", int(step), "transient", sform,
                  "DeepSpeed runtime/fp16/fused_optimizer.py step; runtime/zero/stage_1_and_2.py step; "
                  "runtime/zero/stage3.py _prepare_fp32_grad_for_sub_group"),
    ]


def _deepspeed_buffers(g: ParamGroups, s: Strategy, b: DsBuckets, bc: int, trainable_bytes: float = 4) -> Component:
    z, T = s.zero_stage, g.trainable
    if s.engine == TORCH:
        # DDP's Reducer copies every grad into its flat buckets (torch/nn/parallel/distributed.py,
        # gradient_as_bucket_view=False, the HF Trainer's default); one process alone has no DDP
        size = T * trainable_bytes if s.gpus > 1 else 0
        return Component("deepspeed_buffers", int(size), "transient",
                         "DDP gradient buckets: a copy of every grad" if size else "no DeepSpeed, no DDP (1 GPU)",
                         "torch DistributedDataParallel Reducer; docs/estimate.md#peak-and-overheads")
    if z in (1, 2):
        # the pinned DeepSpeed allocates the reduce buckets at the start of backward (setup_buckets) and frees
        # them in the reduction epilogue (_release_ipg_buffers): not alive in step(). The post-step all-gather
        # writes straight into the flat 16-bit buffer (runtime/utils.py all_gather_dp_groups ->
        # all_gather_into_tensor), so allgather_bucket_size allocates nothing.
        size = min(b.reduce_bucket, max(T, 1)) * bc * (2 if b.overlap_comm else 1)
        form = (f"reduce bucket {b.reduce_bucket:.3g} el x {bc} B"
                f"{' x 2 (overlap_comm double-buffers)' if b.overlap_comm else ''}, capped at the trainable "
                f"count, during backward; the all-gather after step() needs no bucket (all_gather_into_tensor)")
        return Component("deepspeed_buffers", int(size), "transient", form,
                         "DeepSpeed runtime/zero/stage_1_and_2.py setup_buckets, _release_ipg_buffers; "
                         "runtime/utils.py all_gather_dp_groups")
    elif z == 3:
        layer_bytes = g.decoder_layer_params * bc
        if g.quantized_params:  # the layer at the k-bit storage's bytes per weight, fused MoE experts 16-bit
            rest = g.decoder_layer_params - g.layer_fused_params
            layer_bytes = int(rest * bc * g.quantized_bytes / max(1, g.quantized_params * bc)
                              + g.layer_fused_params * bc)
        live = min(b.stage3_max_live_parameters * bc, 2 * layer_bytes + b.stage3_prefetch_bucket * bc)
        size = live + min(b.reduce_bucket, max(T, 1)) * bc
        form = "gathered params: min(stage3_max_live_parameters, 2 decoder layers + prefetch bucket) + reduce bucket"
    else:
        size, form = 0, "no ZeRO buckets"
    return Component("deepspeed_buffers", int(size), "transient", form,
                     "transformers DeepSpeed docs (bucket sizes); docs/estimate.md#peak-and-overheads")


def _activation_transients(
    g: ParamGroups, act: ActivationBreakdown, s: Strategy, bc: int, quant: str
) -> list[Component]:
    out = [
        Component(
            "activations_saved",
            int(act.llm_saved + act.vision_saved + act.projector_saved + act.final_norm_saved),
            "transient",
            "decoder layers"
            + (" inputs only (checkpointing)" if s.grad_ckpt else "")
            + (" + SDPA's explicit mask and repeated k/v per layer (padded micro-batch or sliding window)"
               if act.sdpa_masks and not s.grad_ckpt else "")
            + " + vision LoRA layers + projector, per micro-batch",
            "Korthikanti 2022 (arXiv:2205.05198); measured, docs/estimate.md#activations",
        ),
        Component(
            "logits_loss_peak",
            act.logits_peak + act.head_cast,
            "transient",
            f"{LOGIT_PEAK_BYTES} B x tokens x vocab at the loss backward (fp32 log-softmax + its gradients; "
            "HF Trainer has dropped the 16-bit logits)"
            + (HEAD_CAST if act.head_cast else ""),
            "transformers trainer.py compute_loss + loss_utils.py ForCausalLMLoss; docs/estimate.md#activations",
        ),
    ]
    if act.llm_recompute:
        out.append(Component("recompute_layer", act.llm_recompute, "transient",
                             "one decoder layer's activations while it is recomputed"
                             + (" (with SDPA's explicit mask and repeated k/v: padded micro-batch or sliding window)"
                                if act.sdpa_masks else ""),
                             "gradient checkpointing; docs/estimate.md#activations"))
    if act.weight_casts or act.head_cast:  # plain PyTorch under autocast (activations.py)
        out.append(Component("logits_loss_forward", act.logits_forward + act.head_cast, "transient",
                             f"{LOGIT_FORWARD_BYTES} B x tokens x vocab at the loss forward (16-bit logits, fp32 "
                             "upcast, fp32 log-softmax)" + (HEAD_CAST if act.head_cast else ""),
                             "transformers loss_utils.py ForCausalLMLoss"))
    if act.weight_casts:
        out.append(Component("autocast_weight_casts", act.weight_casts, "transient",
                             f"fp32 trainable weights x {bc} B: autocast's cached 16-bit copies, "
                             + ("held through the forward" if s.grad_ckpt else "saved for backward"),
                             "torch aten/src/ATen/autocast_mode.cpp cached_cast; docs/estimate.md#activations"))
    if g.quantized_bytes and quant == Quant.NF4:
        out.append(Component("dequant_transient", int(g.largest_linear_elems * bc), "transient",
                             "largest 4-bit Linear dequantized to the compute dtype per matmul",
                             "bitsandbytes MatMul4Bit (autograd/_functions.py)"))
    out.append(Component("vision_forward_transient", act.vision_transient, "transient",
                         "vision hidden states of every layer (LLaVA selects layer -2)",
                         "transformers CLIPEncoder output_hidden_states"))
    return out


def _save_gather(s: Strategy, bc: int, largest_trainable: int) -> Component:
    """The checkpoint save under ZeRO-3: the export gathers the trainable params one tensor at a time
    (train/export.py: deepspeed.zero.GatheredParameters per parameter), so the GPU holds the largest one.
    vramplan's ds_config sets stage3_gather_16bit_weights_on_model_save false; DeepSpeed's true gathers
    module by module too and copies the whole 16-bit model to rank 0's CPU RAM (runtime/engine.py
    `_zero3_consolidated_16bit_state_dict`), so either way the GPU side is one gathered tensor."""
    size = largest_trainable * bc - _div(largest_trainable * bc, s.gpus) if s.zero_stage == 3 and s.engine != TORCH \
        else 0
    return Component("save_gather", int(size), "transient",
                     "ZeRO-3: the largest trainable tensor gathered in full for the export, minus this GPU's share"
                     if size else "no gather at save (weights not partitioned)",
                     "train/export.py; DeepSpeed runtime/zero/partition_parameters.py GatheredParameters")


def _phases(g: ParamGroups, s: Strategy, d: dict[str, int], load_bytes_per_param: int) -> dict[str, int]:
    """Allocated bytes at each phase of a step; the peak is the largest."""
    persistent = sum(d[k] for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients",
                                    "optimizer_states") if k in d)
    backward_peak = max(d["logits_loss_peak"], d.get("recompute_layer", 0) + d.get("dequant_transient", 0))
    # autocast's weight copies: saved for backward, or (checkpointing) held through the forward only
    casts = d.get("autocast_weight_casts", 0)
    saved = d["activations_saved"] + (0 if s.grad_ckpt else casts)
    # Before the engine exists the trainer holds the model as built: with k-bit training, peft's
    # prepare_model_for_kbit_training has upcast every non-quantized weight to fp32 (peft utils/other.py).
    load = 0
    if not offloads_params(s.offload):
        unpartitioned = (g.frozen_params + g.trainable) * load_bytes_per_param
        load = d.get("weights_quantized", 0) + (_div(unpartitioned, s.gpus) if s.zero_stage == 3 else unpartitioned)
    # the optimizer step and the save come after backward: the activations (and ZeRO-1/2's buckets) are freed
    step_buffers = 0 if s.zero_stage in (1, 2) and s.engine != TORCH else d["deepspeed_buffers"]
    return {"forward/backward": persistent + saved + backward_peak + d["deepspeed_buffers"],
            "loss forward": persistent + d["activations_saved"] + casts + d.get("logits_loss_forward", 0)
            + d["deepspeed_buffers"],
            "vision forward": persistent + d["vision_forward_transient"] + d["deepspeed_buffers"],
            "optimizer step": persistent + step_buffers + d.get("optimizer_step_transient", 0),
            "checkpoint save": persistent + d.get("save_gather", 0),
            "model load": load}


def _overheads(peak: int, gpus: int, device: str) -> list[Component]:
    out = [Component("allocator_reserve", int(peak * (ALLOCATOR_RESERVE_FACTOR - 1)), "overhead",
                     f"peak allocated x {ALLOCATOR_RESERVE_FACTOR - 1:.2f} (caching-allocator blocks)",
                     "fms-acceleration a100_80gb.csv reserved/allocated; docs/estimate.md#priors")]
    if device == "cpu":
        out.append(Component("process_base", CPU_PROCESS_BASE_RSS, "overhead",
                             "Python + torch + transformers/peft/bitsandbytes loaded (CPU device: memory is RSS)",
                             "measured: tiny-LLaVA trainer peak RSS ~467 MiB; docs/estimate.md#priors"))
        return out
    out.append(Component("cuda_context", CUDA_CONTEXT_BYTES, "overhead", "CUDA context + library workspaces",
                         "vramcalc 0.75 GB; transformers docs 1343 MB; docs/estimate.md#priors"))
    if gpus > 1:
        out.append(Component("nccl_buffers", NCCL_BYTES_PER_RANK, "overhead", "NCCL/HCCL communicator buffers",
                             "0.3-1 GB per rank; docs/estimate.md#priors"))
    return out


def gpu_memory(g: ParamGroups, act: ActivationBreakdown, s: Strategy, buckets: DsBuckets, *,
               compute_bytes: int = 2, quant: str = Quant.NF4, device: str = "cuda",
               load_bytes_per_param: int = 2, optimizer: str = "adamw_torch", trainable_bytes: float = 4,
               largest_trainable: int = 0, frozen_16bit: int = 0) -> GpuMemory:
    """Per-GPU peak memory of one candidate, as named components. `trainable_bytes`: the trainable weights'
    dtype under plain PyTorch (DeepSpeed casts them to the compute dtype and keeps an fp32 master);
    `frozen_16bit`: frozen weights cast back to the compute dtype after peft's k-bit fp32 upcast."""
    comps = (_weights(g, s, compute_bytes, quant, trainable_bytes, frozen_16bit)
             + _optimizer_states(g, s, compute_bytes, optimizer, trainable_bytes)
             + [_deepspeed_buffers(g, s, buckets, compute_bytes, trainable_bytes),
                _save_gather(s, compute_bytes, largest_trainable)]
             + _activation_transients(g, act, s, compute_bytes, quant))
    phases = _phases(g, s, {c.name: c.bytes for c in comps}, load_bytes_per_param)
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    overheads = _overheads(peak, s.gpus, device)
    return GpuMemory(comps + overheads, int(peak), int(peak + sum(c.bytes for c in overheads)), peak_phase)
