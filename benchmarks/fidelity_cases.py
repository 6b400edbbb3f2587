"""How each published case of benchmarks/cases/measured_cases.json is expressed with vramplan's flags.

One entry per case id: either `missing` (the capability vramplan lacks to express it) or the flags
(EstimateOptions fields, i.e. `vramplan estimate` flags) plus how the figure compares:
  stat   allocated (torch.cuda.max_memory_allocated / torchtune "active" or "peak memory"),
         reserved (torch.cuda.max_memory_reserved), smi (nvidia-smi used, or an unstated "GPU memory"
         figure, which we read as what a user sees in nvidia-smi)
  unit   GiB | GB: the unit the source used (read from the case's memory field)
  per    gpu | total (a total over all GPUs, divided by the GPU count)
  verdict_only  the case has no comparable figure: only its fits/OOM outcome is scored
Models outside vramplan's built-in profiles are given as a config.json (benchmarks/cases/models/): a
Llama-layout decoder (RMSNorm, SwiGLU, RoPE, GQA) whose sizes are its published config.json's, or the
published config.json itself (mixtral-8x7b; gemma-7b, model_type gemma: families/gemma.py), or (`traced`)
the published config.json of another architecture, planned through the traced path: only with
`benchmarks/fidelity.py --traced`, since each takes a real-size trace (docs/estimate.md#the-traced-path).
"""

from __future__ import annotations

M = "benchmarks/cases/models/"
FSDP = "FSDP (torch FullyShardedDataParallel): no such strategy in vramplan (ZeRO 0-3 and plain PyTorch only)"
GPTQ = "GPTQ int4 weights: vramplan quantizes with bitsandbytes only (nf4, int8)"
TTLOSS = ("torchtune's chunked cross-entropy (CEWithChunkedOutputLoss, 8 chunks) and torch.compile: "
          "vramplan has no chunked-loss option (its loss peak is the whole fp32 logits)")
QWENVL = "Qwen-VL (ViT + resampler): no such vision family in vramplan (CLIP-LLaVA only)"

# torchtune single-device recipes: plain PyTorch, the whole model in bf16 (LoRA and optimizer states too),
# lora_dropout 0.0 (torchtune recipes' default)
# --no-pad-mask: torchtune and LitGPT pad a micro-batch but call SDPA with is_causal and no padding mask (padding is
# masked in the loss only); fms-hf-tuning and peft's ZeRO-3 example pack (TRL packing=True): no padding at all
TT = dict(zero="none", trainable_dtype="bf16", lora_dropout=0.0, stat="allocated", unit="GiB", pad_mask=False)
# LitGPT finetune/lora.py at 8641822 and its 2024 tables: plain PyTorch, --precision bf16-true, LoRA on q,v
# with dropout 0.05, no activation checkpointing on one device; the longest sample sets the peak
LIT = dict(zero="none", trainable_dtype="bf16", lora_dropout=0.05, lora_targets="q_proj,v_proj",
           grad_ckpt=False, stat="allocated", unit="GB", pad_mask=False)
# HF Trainer + PEFT without DeepSpeed (fms-acceleration 'none'/'baseline-peft-bnb', Qwen finetune.py
# single GPU, LLaMA-Factory, unsloth's HF baseline): LoRA weights fp32 (peft autocast_adapter_dtype)
HF = dict(zero="none", trainable_dtype="fp32")
FMS = dict(HF, lora_r=16, lora_dropout=0.1, lora_targets="q_proj,k_proj,v_proj,o_proj", seq_len=4096,
           grad_ckpt=True, stat="allocated", unit="bytes", pad_mask=False)
QWEN = dict(HF, lora_r=64, lora_dropout=0.05, lora_targets="all-linear", grad_ckpt=True, micro_batch=1,
            stat="smi", unit="GB")
INFER = dict(task="infer", batch=1)
# unsloth's "Hugging Face + FA2" baseline (README 2025-01, C117/C120/C121): QLoRA r 32 on all linear layers,
# batch 1, every sample padded to the length; the baseline's trainer is TRL's SFTTrainer (the README points to the
# Hugging Face "unsloth-trl" benchmark, which ran both on TRL), which under bf16 casts the frozen embeddings and
# lm_head back to bf16 after peft's k-bit upcast (trl trainer/utils.py peft_module_casting_to_bf16): --kbit-embed-dtype
UNSLOTH_HF = dict(HF, recipe="qlora", lora_r=32, lora_dropout=0.0, lora_targets="all-linear", micro_batch=1,
                  grad_ckpt=True, double_quant=False, attn="flash", kbit_embed_dtype="bf16", verdict_only=True)
# bitsandbytes release of each QLoRA case (--bnb-version): before 0.43.2 MatMul4Bit keeps every 4-bit Linear's
# input for backward (bitsandbytes PR #1270, merged 2024-07-16; vramplan/estimate/priors.py BNB_DROPS_KBIT_INPUT).
# Cases not listed here ran after the fix and take the pinned release (fidelity.py's default):
#   fms-acceleration bench of 2024-11 (C063), peft's ZeRO-3 QLoRA docs (C079: "bitsandbytes>=0.43.3"),
#   unsloth's HF baseline of 2025-01 (C117, C120, C121)
BNB_LIT_2023 = "0.41.0"  # lit-gpt requirements-all.txt of 2023 pins bitsandbytes==0.41.0 (tables of 2023-10)
BNB_2024_H1 = "0.43.1"  # runs of Jan-Jul 2024 (LitGPT config_hub 2024-03/04, Answer.AI fsdp_qlora 2024-02/03,
#                        XTuner issue 2024-03, LLaMA-Factory issue 2024-07-11): before the fix was released
BNB_QLORA_2023 = "0.39.0"  # artidoro/qlora (May 2023): the release that introduced 4-bit (CHANGELOG 0.39.0)
# Qwen-1's inference profile (README "Inference Performance", profile.py): "generating 2048 tokens"; the
# Qwen-72B-Chat model card's table of the same profile gives "Context Length 1, Generation Length 2048": a 1-token
# prompt (--prompt 1) whose KV cache grows to 2049 tokens (--context 2049). Its "GPU Memory Usage" is not what
# nvidia-smi shows: the 7B figure (16.99 GB) is below weights + 2049-token KV cache + any CUDA context (the weights
# alone are 15.44 GB), so it is torch's peak allocated, as in the same team's Qwen2.5 speed benchmark
QWEN_PROFILE = dict(INFER, quant="none", context=2049, prompt=1, stat="allocated", unit="GB")
# Qwen2.5's speed benchmark (docs/source/benchmark/speed_benchmark.rst) says "GB", but the 7B bf16 figure
# (14.38) is below its weights in GB: GiB of torch's peak allocated (the case's notes)

CASES: dict[str, dict] = {
    "C001": dict(missing="torchtune optimizer_in_bwd + bnb paged states (outside torch's allocator statistics)"),
    "C002": dict(missing="optimizer not stated (torchtune fuses it into backward)"),
    "C003": dict(missing=TTLOSS),
    "C004": dict(missing="gradient checkpointing not stated"),
    "C005": dict(missing=TTLOSS),
    "C006": dict(missing=FSDP), "C007": dict(missing=FSDP), "C008": dict(missing=FSDP), "C011": dict(missing=FSDP),
    "C019": dict(missing="sequence length not stated (unpacked alpaca, variable)"),
    "C021": dict(missing=TTLOSS),
    "C022": dict(missing=TTLOSS),
    "C023": dict(missing=TTLOSS),
    "C024": dict(missing=TTLOSS),
    "C026": dict(LIT, model=M + "llama-2-7b", recipe="qlora", lora_r=8, micro_batch=1, seq_len=1304,
                 gpus="1xA100-40G", double_quant=False, optimizer="paged_adamw_32bit", bnb_version=BNB_LIT_2023),
    "C027": dict(LIT, model=M + "llama-2-7b", recipe="qlora", lora_r=8, micro_batch=1, seq_len=1304,
                 gpus="1xA100-40G", double_quant=True, optimizer="paged_adamw_32bit", bnb_version=BNB_LIT_2023),
    "C029": dict(LIT, model=M + "llama-2-7b", recipe="lora", lora_r=8, micro_batch=4, seq_len=1304,
                 gpus="1xA100-40G", verdict_only=True),
    "C030": dict(LIT, model=M + "llama-2-13b", recipe="lora", lora_r=8, micro_batch=1, seq_len=1304,
                 gpus="1xA100-40G"),
    "C031": dict(LIT, model=M + "llama-2-13b", recipe="qlora", lora_r=8, micro_batch=1, seq_len=1304,
                 gpus="1xA100-40G", double_quant=False, optimizer="paged_adamw_32bit", bnb_version=BNB_LIT_2023),
    "C032": dict(LIT, model=M + "llama-2-13b", recipe="qlora", lora_r=8, micro_batch=1, seq_len=1304,
                 gpus="1xA100-40G", double_quant=True, optimizer="paged_adamw_32bit", bnb_version=BNB_LIT_2023),
    "C034": dict(LIT, model=M + "falcon-40b", recipe="qlora", lora_r=8, lora_targets="query_key_value", micro_batch=1,
                 seq_len=1079, gpus="1xA100-40G", double_quant=True, optimizer="paged_adamw_32bit",
                 bnb_version=BNB_LIT_2023, verdict_only=True, traced=True,
                 note="HF Falcon's fused query_key_value adapted whole (lit-gpt adapts its q and v parts)"),
    "C035": dict(missing=FSDP), "C036": dict(missing=FSDP),
    "C039": dict(INFER, model=M + "llama-2-7b", quant="none", context=64, gpus="1xA100-40G", stat="allocated",
                 unit="GB"),
    "C040": dict(INFER, model=M + "llama-2-7b", quant="nf4", context=64, gpus="1xA100-40G", stat="allocated",
                 unit="GB"),
    "C043": dict(INFER, model=M + "codellama-34b", quant="none", context=64, gpus="1xA100-40G", verdict_only=True),
    "C046": dict(INFER, model=M + "llama-2-70b", quant="nf4", context=64, gpus="1xA100-40G", stat="allocated",
                 unit="GB"),
    "C047": dict(LIT, model=M + "llama-2-7b", recipe="lora", lora_r=32, micro_batch=2, seq_len=512, gpus="1xA10"),
    "C050": dict(LIT, model=M + "llama-3.1-8b", recipe="qlora", lora_r=32, micro_batch=2, seq_len=512, gpus="1xA10",
                 double_quant=False, optimizer="paged_adamw_32bit", bnb_version=BNB_2024_H1),
    "C051": dict(LIT, model=M + "mistral-7b", recipe="qlora", lora_r=32, micro_batch=2, seq_len=512, gpus="1xA10",
                 double_quant=False, optimizer="paged_adamw_32bit", bnb_version=BNB_2024_H1),
    "C052": dict(missing=FSDP),
    "C053": dict(LIT, model=M + "gemma-7b", recipe="lora", lora_r=32, micro_batch=1, seq_len=512, gpus="1xA10"),
    "C054": dict(FMS, model=M + "mistral-7b", recipe="full", micro_batch=4, gpus="1xA100-80G", trainable_dtype="bf16",
                 lora_r=None, lora_dropout=None, lora_targets=None,
                 value_key="torch_peak_alloc_bytes"),
    "C055": dict(missing=FSDP),
    "C056": dict(FMS, model=M + "mistral-7b", recipe="lora", micro_batch=4, gpus="1xA100-80G",
                 value_key="torch_peak_alloc_bytes"),
    "C057": dict(FMS, model=M + "mistral-7b", recipe="lora", micro_batch=8, gpus="1xA100-80G",
                 value_key="torch_peak_alloc_bytes"),
    "C059": dict(missing=FSDP), "C060": dict(missing=FSDP),
    "C063": dict(FMS, model=M + "llama-2-70b", recipe="qlora", micro_batch=4, gpus="1xA100-80G", double_quant=True,
                 verdict_only=True),
    # transformers 4.45 (the case's requirements): one nn.Linear per expert, all 4-bit; LoRA on the attention only
    "C065": dict(FMS, model=M + "mixtral-8x7b", recipe="qlora", micro_batch=4, gpus="1xA100-80G", double_quant=True,
                 transformers_version="4.45.2", value_key="torch_peak_alloc_bytes"),
    "C066": dict(missing=FSDP), "C068": dict(missing=FSDP),
    "C071": dict(zero="none", trainable_dtype="bf16", model=M + "llama-2-7b", recipe="qlora", lora_r=64,
                 lora_dropout=0.0, lora_targets="q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj", micro_batch=8,
                 seq_len=2048, grad_ckpt=True, gpus="2xRTX3090", double_quant=True, stat="reserved", unit="GiB",
                 note="FSDP NO_SHARD = plain data parallel: every GPU holds the whole model", bnb_version=BNB_2024_H1),
    "C073": dict(missing=FSDP), "C075": dict(missing=FSDP), "C076": dict(missing=FSDP), "C078": dict(missing=FSDP),
    "C079": dict(model=M + "llama-2-70b", recipe="qlora", zero=3, offload="none", lora_r=8, lora_dropout=0.1,
                 lora_targets="all-linear", micro_batch=2, seq_len=2048, grad_ckpt=True, gpus="2xA100-40G",
                 double_quant=True, stat="smi", unit="GB", pad_mask=False),
    "C080": dict(missing=FSDP),
    "C082": dict(HF, model=M + "bloomz-7b1", recipe="full", quant="none", micro_batch=8, seq_len=64, grad_ckpt=False,
                 gpus="1xA100-80G", verdict_only=True, traced=True),
    "C083": dict(HF, model=M + "llama-65b", recipe="qlora", lora_r=64, lora_dropout=0.05, lora_targets="all-linear",
                 micro_batch=1, seq_len=528, grad_ckpt=True, gpus="1xRTX-A6000", double_quant=True,
                 optimizer="paged_adamw_32bit", attn="eager", verdict_only=True, trainable_dtype="bf16",
                 kbit_embed_dtype="bf16", bnb_version=BNB_QLORA_2023,
                 note="qlora.py casts the LoRA layers, embed_tokens and lm_head to bf16 under --bf16"),
    # finetune.py's LoRA (emb): peft's ModulesToSaveWrapper deep-copies wte and lm_head in the model's bf16 (Qwen's
    # modeling_qwen.py casts the model to bf16), and only the LoRA factors are fp32: --trainable-dtype peft
    "C087": dict(QWEN, model=M + "qwen-7b", recipe="lora", seq_len=2048, gpus="1xA100-80G",
                 modules_to_save="embed_tokens,lm_head", trainable_dtype="peft"),
    "C088": dict(missing=GPTQ),
    "C091": dict(model=M + "qwen-7b", recipe="full", zero=3, offload="none", micro_batch=1, seq_len=1024,
                 grad_ckpt=True, gpus="2xA100-80G", stat="smi", unit="GB", per="total"),
    "C092": dict(model=M + "qwen-7b", recipe="full", zero=3, offload="none", micro_batch=1, seq_len=2048,
                 grad_ckpt=True, gpus="2xA100-80G", verdict_only=True),
    "C093": dict(QWEN, model=M + "qwen-14b", recipe="lora", seq_len=2048, gpus="1xA100-80G"),
    "C095": dict(QWEN, model=M + "qwen-72b", recipe="lora", zero=3, offload="none", trainable_dtype=None,
                 seq_len=2048, gpus="4xA100-80G", per="total"),
    "C096": dict(missing=GPTQ),
    "C098": dict(missing="naive model parallelism (device_map over 4 GPUs) for training; seq_len not stated"),
    "C099": dict(QWEN_PROFILE, model=M + "qwen-7b", gpus="1xA100-80G"),
    "C100": dict(missing=GPTQ),
    "C101": dict(QWEN_PROFILE, model=M + "qwen-14b", gpus="1xA100-80G"),
    "C102": dict(QWEN_PROFILE, model=M + "qwen-72b", gpus="2xA100-80G", per="total"),
    "C103": dict(missing=GPTQ),
    "C104": dict(INFER, model=M + "qwen2.5-7b", quant="none", context=2049, gpus="1xA100-80G", stat="allocated",
                 unit="GiB"),
    "C105": dict(INFER, model=M + "qwen2.5-7b", quant="none", context=32768, gpus="1xA100-80G", stat="allocated",
                 unit="GiB"),
    "C108": dict(INFER, model=M + "qwen2.5-14b", quant="none", context=32768, gpus="1xA100-80G", stat="allocated",
                 unit="GiB"),
    "C109": dict(INFER, model=M + "qwen2.5-72b", quant="none", context=2049, gpus="2xA100-80G", stat="allocated",
                 unit="GiB", per="total"),
    # optimize-llm.md's prompt ("Question: Please write a function in Python that transforms bytes to Giga
    # bytes.\n\nAnswer:") + 60 new tokens: 80 tokens of context
    "C113": dict(INFER, model=M + "octocoder", quant="int8", context=80, gpus="1xA100-40G", stat="allocated",
                 unit="GiB", traced=True),
    "C114": dict(INFER, model=M + "octocoder", quant="nf4", context=80, gpus="1xA100-40G", stat="allocated",
                 unit="GiB", traced=True),
    "C115": dict(missing="prompt length not stated (\"several thousand tokens\"); GPT-BigCode itself is traced "
                         "(C113, C114)"),
    "C117": dict(UNSLOTH_HF, model=M + "llama-3.1-8b", seq_len=5789, gpus="1xRTX4090"),
    "C120": dict(UNSLOTH_HF, model=M + "llama-3.1-70b", seq_len=6916, gpus="1xA100-80G"),
    "C121": dict(UNSLOTH_HF, model=M + "llama-3.1-70b", seq_len=1024, gpus="1xRTX-A6000"),
    "C122": dict(missing=QWENVL), "C123": dict(missing=QWENVL), "C126": dict(missing=QWENVL),
    "C127": dict(missing=QWENVL), "C128": dict(missing=QWENVL),
    "C132": dict(model="llava-v1.5-13b", recipe="full", zero=3, offload="none", micro_batch=16, seq_len=2048,
                 grad_ckpt=True, gpus="8xA100-80G", verdict_only=True, attn="flash"),
    "C133": dict(model="llava-v1.5-7b", recipe="full", zero=3, offload="none", seq_len=2048, grad_ckpt=True,
                 gpus="8xA100-40G", verdict_only=True, any_micro_batch=True, attn="flash"),
    "C135": dict(model="llava-v1.5-7b", recipe="lora", zero=3, offload="none", seq_len=2048, grad_ckpt=True,
                 gpus="8xRTX3090", verdict_only=True, any_micro_batch=True, attn="flash"),
    "C136": dict(missing="no figure (an upper bound '<8 GB') and no GPU named"),
    # `srun --ntasks-per-node=1 --nodes=2 deepspeed train_mem.py ...` with no hostfile: each node's DeepSpeed
    # launcher finds none and "will proceed with training with local resources only" (launcher/runner.py
    # fetch_hostfile; the resource pool becomes localhost, master_addr 127.0.0.1), so the two nodes ran two
    # separate 4-GPU jobs. ZeRO-2 shards over 4, not 8. Buckets as LLaVA's scripts/zero2.json leaves them:
    # reduce_bucket_size "auto" (hidden^2 from the HF Trainer), allgather_bucket_size unset (DeepSpeed's 5e8)
    "C137": dict(model="llava-v1.5-7b", recipe="full", zero=2, offload="none", micro_batch=1, seq_len=2048,
                 grad_ckpt=True, gpus="4xA100-40G", world_gpus=4, ds_buckets="auto,5e8", verdict_only=True,
                 attn="flash"),
    "C139": dict(missing="DeepSpeed stage and micro-batch not stated"),
    "C141": dict(model="llava-v1.5-13b", recipe="qlora", micro_batch=16, seq_len=2048, grad_ckpt=True,
                 gpus="1xRTX3090", verdict_only=True, any_stage=True, bnb_version=BNB_2024_H1),
    "C142": dict(missing="Idefics2 (perceiver, DPO with a reference pass): no such family/task"),
    "C145": dict(model=M + "gpt2-10b-megatron", recipe="full", quant="none", zero=2, offload="optimizer",
                 micro_batch=10, seq_len=1024, grad_ckpt=True, gpus="1xV100-32G", verdict_only=True, traced=True,
                 note="Megatron-LM GPT-2 as transformers' GPT2LMHeadModel (the same layout)"),
    "C146": dict(HF, model=M + "glm-4-9b", recipe="qlora", lora_r=8, lora_dropout=0.0, lora_targets="all-linear",
                 micro_batch=1, seq_len=10240, grad_ckpt=True, gpus="1xA100-80G", double_quant=False, stat="smi",
                 unit="GB", note="ChatGLM counted as a Llama-layout decoder of its sizes", bnb_version=BNB_2024_H1),
    "C148": dict(model=M + "llama-2-70b", recipe="full", zero=3, offload="none", micro_batch=1, seq_len=8192,
                 grad_ckpt=True, gpus="4x8xA100-80G", verdict_only=True),
}
