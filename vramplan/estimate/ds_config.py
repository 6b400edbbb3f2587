"""The DeepSpeed config vramplan generates for each candidate.

Pure and JSON-serialisable. Bucket sizes are explicit numbers (not "auto") because the memory
model charges them (types.DsBuckets; docs/estimate.md#deepspeed-config); optimizer/scheduler
hyper-parameters are "auto" so the HF Trainer fills them from the same plan (transformers' DeepSpeed
integration checks they agree); no scheduler section, so the Trainer builds the recipe's warmup +
cosine schedule itself.
Layout follows XTuner's xtuner/configs/deepspeed/deepspeed_zero{1,2,2_offload,3,3_offload}.json and LLaVA's
scripts/zero{2,3}.json.
"""

from __future__ import annotations

from vramplan.estimate.priors import DEFAULT_BUCKET_ELEMS
from vramplan.estimate.types import DsBuckets, Offload, Strategy, offloads_optimizer

SUB_GROUP_SIZE = 1_000_000_000  # ZeRO-3 elements stepped at once (the fp32 grads made per sub-group: gpu_memory.py)


def buckets_for(hidden_size: int, trainable: int, given: tuple[int, ...] = ()) -> DsBuckets:
    """Bucket sizes: HF's ZeRO-3 "auto" rules (reduce = h^2, prefetch = 0.9 h^2; transformers
    integration/deepspeed.py fill_match) and a 2e8 cap for ZeRO-1/2 buckets. `given` (--ds-buckets): the
    ZeRO-1/2 (reduce, allgather) elements of the user's config, 0 = "auto" (h^2, the HF Trainer's fill)."""
    h2 = hidden_size * hidden_size
    reduce, allgather = DEFAULT_BUCKET_ELEMS, DEFAULT_BUCKET_ELEMS
    if given:
        reduce, allgather = (v or h2 for v in given)
    return DsBuckets(reduce_bucket=reduce, allgather_bucket=allgather, overlap_comm=True,
                     stage3_prefetch_bucket=int(0.9 * h2), stage3_max_live_parameters=1_000_000_000)


def make_ds_config(s: Strategy, b: DsBuckets, *, compute_dtype: str, hidden_size: int,
                   gradient_clipping: float = 1.0, optimizer: str = "adamw_torch") -> dict:
    """The config; with an optimizer other than adamw_torch there is no "optimizer" section, so the HF Trainer
    builds the recipe's `optim` (e.g. bitsandbytes AdamW8bit) and DeepSpeed wraps it as a client optimizer
    (runtime/engine.py `_configure_optimizer`; zero_allow_untested_optimizer lets ZeRO take it)."""
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage in (1, 2):
        zero.update({
            "overlap_comm": b.overlap_comm,  # overlaps reduce with backward; doubles the reduce bucket
            "contiguous_gradients": True,  # copies grads into one buffer: less fragmentation
            "reduce_scatter": True,
            "reduce_bucket_size": b.reduce_bucket,  # elements; larger = faster comm, more memory
            "allgather_bucket_size": b.allgather_bucket,  # elements; same trade-off for the param all-gather
        })
    elif s.zero_stage == 3:
        zero.update({
            "overlap_comm": b.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": b.reduce_bucket,
            "stage3_prefetch_bucket_size": b.stage3_prefetch_bucket,  # params fetched ahead; more = faster, more memory
            "stage3_param_persistence_threshold": 10 * hidden_size,  # params smaller than this stay unpartitioned
            "stage3_max_live_parameters": b.stage3_max_live_parameters,  # cap on gathered params alive at once
            "stage3_max_reuse_distance": 1_000_000_000,
            "sub_group_size": SUB_GROUP_SIZE,  # params per optimizer sub-step; lower it if OOM hits in the step
            "stage3_gather_16bit_weights_on_model_save": False,  # adapters are saved by peft, no full gather
        })
    if offloads_optimizer(s.offload) and s.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}  # GPU memory -> CPU RAM; slower step
    if s.offload == Offload.PARAMS and s.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}  # weights live in CPU RAM; much slower
    cfg = {
        "train_micro_batch_size_per_gpu": s.micro_batch,
        "gradient_accumulation_steps": s.grad_accum,
        "train_batch_size": s.micro_batch * s.grad_accum * s.gpus,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }
    if optimizer != "adamw_torch":
        del cfg["optimizer"]
    if compute_dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif compute_dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg
