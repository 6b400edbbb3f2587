"""The published throughputs of benchmarks/cases/measured_cases.json, expressed in vramplan's terms.

One entry per case with a `throughput_or_time`: what vramplan needs to estimate it (model architecture,
hardware profile, method, parallel layout, tokens per micro-batch) and how the published figure becomes
tokens/s per GPU (`per_gpu`, stated per case in `conversion`). A case vramplan cannot express carries
`skip` with the reason. Architectures are the models' Hugging Face config.json values.
"""

from __future__ import annotations

# name -> (layers, hidden, intermediate, heads, kv_heads, vocab, tied, attention_bias); HF config.json of each
ARCH = {
    "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256, False, False),  # meta-llama/Llama-3.1-8B
    "llama-3.1-70b": (80, 8192, 28672, 64, 8, 128256, False, False),  # meta-llama/Llama-3.1-70B
    "llama-3.1-405b": (126, 16384, 53248, 128, 8, 128256, False, False),  # meta-llama/Llama-3.1-405B
    "llama-3.2-3b": (28, 3072, 8192, 24, 8, 128256, True, False),  # meta-llama/Llama-3.2-3B
    "llama-2-7b": (32, 4096, 11008, 32, 32, 32000, False, False),  # meta-llama/Llama-2-7b-hf
    "llama-2-13b": (40, 5120, 13824, 40, 40, 32000, False, False),  # meta-llama/Llama-2-13b-hf
    "llama-2-70b": (80, 8192, 28672, 64, 8, 32000, False, False),  # meta-llama/Llama-2-70b-hf
    "mistral-7b": (32, 4096, 14336, 32, 8, 32000, False, False),  # mistralai/Mistral-7B-v0.1
    "yi-34b": (60, 7168, 20480, 56, 8, 64000, False, False),  # 01-ai/Yi-34B
    "qwen-7b": (32, 4096, 11008, 32, 32, 151936, False, True),  # Qwen/Qwen-7B (c_attn has a bias; w1/w2 11008)
    "qwen-14b": (40, 5120, 13696, 40, 40, 152064, False, True),  # Qwen/Qwen-14B
    "qwen-72b": (80, 8192, 24576, 64, 64, 152064, False, True),  # Qwen/Qwen-72B
    "qwen2.5-7b": (28, 3584, 18944, 28, 4, 152064, False, True),  # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-14b": (48, 5120, 13824, 40, 8, 152064, False, True),  # Qwen/Qwen2.5-14B-Instruct
    "qwen2.5-72b": (80, 8192, 29568, 64, 8, 152064, False, True),  # Qwen/Qwen2.5-72B-Instruct
}
# mixtures of experts: their published config.json (benchmarks/cases/models/), and whether the run's transformers
# fused the experts (5.x) or kept one Linear per expert (4.x: fms-acceleration's bench ran 4.45)
MOE = {"mixtral-8x7b": False}
# Qwen-VL-Chat's ViT-bigG tower (Qwen/Qwen-VL-Chat visual config: 48 layers, width 1664, mlp 8192, 16 heads,
# 448 px, patch 14); its resampler gives the LLM 256 tokens per image.
QWEN_VL_VISION = (48, 1664, 8192, 16, 448, 14)

QV = ["q_proj", "v_proj"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_O = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
ALPACA_MEAN = 140  # Alpaca sample (prompt template + instruction + input + response), Llama-2 tokenizer: assumed

TT = "torchtune README: packed 2048-token rows, batch 2, no accumulation; 'Tokens/sec' is the whole job's"
TT3 = "torchtune README optimisation table: packed 4096-token rows, batch 2; tokens/s of the one GPU"
LG = ("LitGPT resource table: min per 1,000 micro-batches of Alpaca (mean about 140 tokens, the longest of a "
      "micro-batch sets its padded length: assumed 140 for 1 sample, 250 for 4)")
LGH = ("LitGPT config_hub: runtime of N epochs over Alpaca2k (1,900 training samples, 2 per micro-batch, padded "
       "to the longer: assumed 180 tokens); the runtime includes validation, the estimate covers training only")
FMS = "fms-acceleration a100_80gb.csv train_tokens_per_second: HF Trainer's per-device figure"
AAI = "Answer.AI FSDP-QLoRA benchmark: 1,024 dummy samples filling the context, split over 2 GPUs; run time"
QW = "Qwen README: s/it of an optimizer step = 8 micro-batches of 1 x seq per GPU"


def c(cid, arch, hw, method, per_gpu, conversion, *, gpus=1, mb=1, seq=2048, gc=True, zero=0, offload="none",
      lora=None, r=8, quant=None, stack="hf", images=0, vision=None, epochs=1, samples=0, skip=None, accum=1,
      compiled=None):
    return dict(id=cid, arch=arch, hw=hw, method=method, per_gpu=per_gpu, conversion=conversion, gpus=gpus, mb=mb,
                seq=seq, gc=gc, zero=zero, offload=offload, lora=lora, r=r,
                quant=quant or ("nf4" if method == "qlora" else "none"), stack=stack, images=images, vision=vision,
                epochs=epochs, samples=samples, skip=skip, accum=accum,
                compiled=stack == "torchtune" if compiled is None else compiled)


TRAIN = [
    c("C001", "llama-3.1-8b", "rtx-4090", "full", 1650, TT + " = per GPU (1 GPU)", mb=2, stack="torchtune"),
    c("C002", "llama-3.1-8b", "rtx-a6000", "full", 2579, TT + " = per GPU (1 GPU); checkpointing not stated (on "
      "assumed)", mb=2, stack="torchtune"),
    c("C003", "llama-3.1-8b", "rtx-4090", "lora", 3083, TT + " = per GPU (1 GPU)", mb=2, lora=QV, stack="torchtune"),
    c("C004", "llama-3.1-8b", "rtx-a6000", "lora", 4699, TT + " = per GPU (1 GPU); checkpointing not stated (off "
      "assumed)", mb=2, lora=QV, gc=False, stack="torchtune"),
    c("C005", "llama-3.1-8b", "rtx-4090", "qlora", 2413, TT + " = per GPU (1 GPU)", mb=2, lora=ALL, quant="nf4",
      stack="torchtune"),
    c("C006", "llama-3.1-70b", "a100-80gb", "full", 1568 / 8, TT + " / 8 GPUs", gpus=8, mb=2, zero=3,
      offload="optimizer+params", stack="torchtune"),
    c("C007", "llama-3.1-70b", "a100-80gb", "lora", 3497 / 8, TT + " / 8 GPUs", gpus=8, mb=2, zero=3,
      lora=["q_proj", "k_proj", "v_proj"], r=16, stack="torchtune"),
    c("C008", "llama-3.1-405b", "a100-80gb", "qlora", 653 / 8, TT + " / 8 GPUs", gpus=8, mb=2, zero=3, lora=ALL,
      r=16, stack="torchtune"),
    c("C011", "llama-2-7b", "rtx-4090", "lora", 2768 / 2, "torchtune README (PR #955): tokens/sec of the job / 2 "
      "GPUs; FSDP (no compile in that recipe then)", gpus=2, mb=4, zero=3, lora=QV, gc=False, stack="torchtune",
      compiled=False),
    c("C021", "llama-3.2-3b", "a100-80gb", "full", 7075, TT3 + "; packing only (no compile)", mb=2, seq=4096,
      gc=False, stack="torchtune", compiled=False),
    c("C022", "llama-3.2-3b", "a100-80gb", "full", 7210, TT3, mb=2, seq=4096, stack="torchtune"),
    c("C023", "llama-3.2-3b", "a100-80gb", "lora", 8210, TT3, mb=2, seq=4096,
      lora=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=64, stack="torchtune"),
    c("C024", "llama-3.2-3b", "a100-80gb", "qlora", 8035, TT3, mb=2, seq=4096,
      lora=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=64, stack="torchtune"),
    c("C026", "llama-2-7b", "a100-40gb", "qlora", 140 * 1000 / (3.68 * 60), LG, seq=140, gc=False, lora=QV,
      stack="litgpt"),
    c("C027", "llama-2-7b", "a100-40gb", "qlora", 140 * 1000 / (3.83 * 60), LG, seq=140, gc=False, lora=QV,
      stack="litgpt"),
    c("C030", "llama-2-13b", "a100-40gb", "lora", 140 * 1000 / (3.19 * 60), LG, seq=140, gc=False, lora=QV,
      stack="litgpt"),
    c("C031", "llama-2-13b", "a100-40gb", "qlora", 140 * 1000 / (6.38 * 60), LG, seq=140, gc=False, lora=QV,
      stack="litgpt"),
    c("C032", "llama-2-13b", "a100-40gb", "qlora", 140 * 1000 / (6.55 * 60), LG, seq=140, gc=False, lora=QV,
      stack="litgpt"),
    c("C035", "llama-2-7b", "a100-40gb", "lora", 140 * 1000 / (5.93 * 60), LG + "; per GPU (FSDP, 2 GPUs)",
      gpus=2, seq=140, zero=3, lora=QV, stack="litgpt"),
    c("C036", "llama-2-7b", "a100-40gb", "lora", 4 * 250 * 1000 / (8.66 * 60), LG + "; per GPU (FSDP, 2 GPUs)",
      gpus=2, mb=4, seq=250, zero=3, lora=QV, stack="litgpt"),
    c("C047", "llama-2-7b", "a10g", "lora", 4 * 1900 * 180 / (32.82 * 60), LGH + "; 4 epochs", mb=2, seq=180,
      gc=False, lora=QV, r=32, stack="litgpt"),
    c("C050", "llama-3.1-8b", "a10g", "qlora", 2 * 1900 * 180 / (22.24 * 60), LGH + "; 2 epochs (Llama-3-8B)",
      mb=2, seq=180, gc=False, lora=QV, r=32, stack="litgpt"),
    c("C051", "mistral-7b", "a10g", "qlora", 4 * 1900 * 180 / (44.75 * 60), LGH + "; 4 epochs", mb=2, seq=180,
      gc=False, lora=QV, r=32, stack="litgpt"),
    c("C054", "mistral-7b", "a100-80gb", "full", 3062.694, FMS, mb=4, seq=4096),
    c("C055", "mistral-7b", "a100-80gb", "full", 2777.18, FMS + "; FSDP full shard, 2 GPUs", gpus=2, mb=2,
      seq=4096, zero=3),
    c("C056", "mistral-7b", "a100-80gb", "lora", 3324.155, FMS, mb=4, seq=4096, lora=QKVO, r=16),
    c("C057", "mistral-7b", "a100-80gb", "lora", 3353.809, FMS, mb=8, seq=4096, lora=QKVO, r=16),
    c("C059", "mistral-7b", "a100-80gb", "qlora", 2949.205, FMS + "; FSDP full shard, 2 GPUs", gpus=2, mb=2,
      seq=4096, zero=3, lora=QKVO, r=16),
    c("C065", "mixtral-8x7b", "a100-80gb", "qlora", 1528.07, FMS, mb=4, seq=4096, lora=QKVO, r=16),
    c("C066", "llama-2-7b", "rtx-3090", "qlora", 1024 * 512 / 2 / 1082, AAI + ", context 512, batch 1",
      gpus=2, seq=512, zero=3, lora=NO_O, r=64),
    c("C068", "llama-2-7b", "rtx-3090", "lora", 1024 * 2048 / 2 / 3090, AAI + ", context 2048, batch 1",
      gpus=2, seq=2048, zero=3, lora=NO_O, r=64),
    c("C071", "llama-2-7b", "rtx-3090", "qlora", 1024 * 2048 / 2 / 875, AAI + ", context 2048, batch 8, DDP",
      gpus=2, mb=8, seq=2048, zero=0, lora=NO_O, r=64),
    c("C073", "yi-34b", "rtx-3090", "qlora", 1024 * 2048 / 2 / 5041, AAI + ", context 2048, batch 2", gpus=2,
      mb=2, seq=2048, zero=3, lora=NO_O, r=64),
    c("C075", "llama-2-70b", "rtx-3090", "qlora", 1024 * 2048 / 2 / 11795, AAI + ", context 2048, batch 2, "
      "parameters offloaded to CPU", gpus=2, mb=2, seq=2048, zero=3, offload="optimizer+params", lora=NO_O, r=64),
    c("C076", "mistral-7b", "rtx-4090", "qlora", 1024 * 24576 / 2 / 7809, AAI + ", context 24576, batch 1, "
      "parameters offloaded to CPU", gpus=2, seq=24576, zero=3, offload="optimizer+params", lora=NO_O, r=64),
    c("C083", "llama-65b", "rtx-a6000", "qlora", 0, "QLoRA README abstract: '24 hours' on one 48GB GPU",
      skip="a round claim of an abstract: the GPU type and the samples' lengths are not stated"),
    c("C087", "qwen-7b", "a100-80gb", "lora+emb", 8 * 2048 / 5.3, QW, lora=ALL, r=64),
    c("C088", "qwen-7b", "a100-80gb", "qlora", 8 * 256 / 3.0, QW + "; GPTQ int4, DeepSpeed ZeRO-2", seq=256,
      zero=2, lora=ALL, r=64),
    c("C091", "qwen-7b", "a100-80gb", "full", 8 * 1024 / 4.5, QW + "; ZeRO-3, 2 GPUs", gpus=2, seq=1024, zero=3,
      accum=8),
    c("C093", "qwen-14b", "a100-80gb", "lora", 8 * 2048 / 8.4, QW, lora=ALL, r=64),
    c("C095", "qwen-72b", "a100-80gb", "lora", 8 * 2048 / 45.7, QW + "; ZeRO-3, 4 GPUs", gpus=4, zero=3, lora=ALL,
      r=64, accum=8),
    c("C096", "qwen-72b", "a100-80gb", "qlora", 8 * 2048 / 59.5, QW + "; GPTQ int4, ZeRO-2", zero=2, lora=ALL,
      r=64, accum=8),
    c("C122", "qwen-7b", "a100-80gb", "lora", 8 * 384 / 2.2, QW + "; 258 of the 384 tokens are the image's",
      seq=384, lora=ALL, r=64, images=1, vision="qwen-vl"),
    c("C123", "qwen-7b", "a100-80gb", "lora", 8 * 2048 / 5.9, QW + "; one image (258 tokens) per sample",
      lora=ALL, r=64, images=1, vision="qwen-vl"),
    c("C126", "qwen-7b", "a100-80gb", "qlora", 8 * 2048 / 7.9, QW + "; GPTQ int4, ZeRO-2, one image per sample",
      zero=2, lora=ALL, r=64, images=1, vision="qwen-vl"),
    c("C132", "llava-v1.5-13b", "a100-80gb", "full", 665000 * 876 / (20 * 3600) / 8,
      "LLaVA README: ~20 h for 665K samples on 8 GPUs; samples assumed 576 image + 300 text tokens", gpus=8,
      mb=16, seq=876, zero=3, images=1),
    c("C133", "llava-v1.5-7b", "a100-40gb", "full", 665000 * 876 / (10 * 3600) / 8,
      "LLaVA README: ~10 h for 665K samples on 8 GPUs; samples assumed 576 image + 300 text tokens", gpus=8,
      mb=16, seq=876, zero=3, images=1),
    c("C148", "llama-2-70b", "a100-80gb", "full", 216.8, "XTuner benchmark: TGS = tokens per GPU per second",
      gpus=32, seq=8192, zero=3),
]

# decode: (id, arch, hw, weights, kernel, gpus, context (mean over the generated tokens), tok/s, conversion)
LG_GEN = "LitGPT generate/base.py: 50 new tokens after a 6-token prompt; tokens/s as printed (batch 1)"
QW_GEN = "Qwen README: 2,048 generated tokens, batch 1; tokens/s as reported"
Q25 = "Qwen2.5 speed benchmark: 2,048 generated tokens after the stated input, batch 1; tokens/s as reported"
DECODE = [
    ("C039", "llama-2-7b", "a100-40gb", "bf16", "bnb", 1, 31, 30.97, LG_GEN, "litgpt"),
    ("C040", "llama-2-7b", "a100-40gb", "nf4", "bnb", 1, 31, 19.98, LG_GEN, "litgpt"),
    ("C046", "llama-2-70b", "a100-40gb", "nf4", "bnb", 1, 31, 7.97, LG_GEN, "litgpt"),
    ("C099", "qwen-7b", "a100-80gb", "bf16", "", 1, 1024, 40.93, QW_GEN, "hf"),
    ("C100", "qwen-7b", "a100-80gb", "int4", "gptq", 1, 1024, 50.09, QW_GEN, "hf"),
    ("C101", "qwen-14b", "a100-80gb", "bf16", "", 1, 1024, 32.22, QW_GEN, "hf"),
    ("C102", "qwen-72b", "a100-80gb", "bf16", "", 2, 1024, 8.48, QW_GEN + " (2 GPUs, layers split)", "hf"),
    ("C103", "qwen-72b", "a100-80gb", "int4", "gptq", 1, 1024, 11.32, QW_GEN, "hf"),
    ("C104", "qwen2.5-7b", "a100-80gb", "bf16", "", 1, 1 + 1024, 40.38, Q25 + " (input 1)", "hf"),
    ("C105", "qwen2.5-7b", "a100-80gb", "bf16", "", 1, 30720 + 1024, 18.83, Q25 + " (input 30720)", "hf"),
    ("C108", "qwen2.5-14b", "a100-80gb", "bf16", "", 1, 30720 + 1024, 8.20, Q25 + " (input 30720)", "hf"),
    ("C109", "qwen2.5-72b", "a100-80gb", "bf16", "", 2, 1 + 1024, 8.73, Q25 + " (input 1; 2 GPUs)", "hf"),
]
