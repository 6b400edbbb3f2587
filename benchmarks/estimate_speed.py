"""Benchmark: how long `vramplan estimate` takes vs the usual alternative.

The alternative (what `accelerate estimate-memory` does): import torch + transformers and build
the model on the meta device to count its parameters - before any ZeRO/offload/activation math.

    python benchmarks/estimate_speed.py            # prints times and ratios
Targets (docs/architecture.md#speed): full sweep for 1x24G < 0.5 s wall; a sweep up to 1024 GPUs < 1 s (2-core machine).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    py = sys.executable
    est = [py, "-m", "vramplan", "estimate", "--json"]
    t24 = wall(est + ["--gpus", "1x24G"])
    t1024 = wall(est + ["--gpus", "128x8xH100-80G"])
    meta = wall([py, "-c", (
        "from accelerate import init_empty_weights\n"
        "from transformers import LlavaConfig, LlavaForConditionalGeneration, LlamaConfig, CLIPVisionConfig\n"
        "t = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,"
        " num_key_value_heads=8, vocab_size=128257)\n"
        "v = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,"
        " image_size=336, patch_size=14)\n"
        "with init_empty_weights():\n"
        "    m = LlavaForConditionalGeneration(LlavaConfig(text_config=t, vision_config=v))\n"
        "print(sum(p.numel() for p in m.parameters()))\n")], repeat=2)
    print(f"vramplan estimate --gpus 1x24G (full sweep, whole process): {t24:.3f} s  (target < 0.5 s)")
    print(f"vramplan estimate --gpus 128x8xH100-80G (1024 GPUs):         {t1024:.3f} s  (target < 1 s)")
    print(f"peer: import torch+transformers, build LLaVA-8B on meta:      {meta:.3f} s  (param count only)")
    print(f"ratio peer / vramplan (1x24G): {meta / t24:.1f}x")


if __name__ == "__main__":
    main()
