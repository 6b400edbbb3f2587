"""Write a real-architecture LLaVA with random weights from a vramplan model profile.

Random weights at the real architecture use the same memory as the real checkpoint, so a GPU
machine without internet can measure real-size peaks with the bundled trainer:

    python benchmarks/make_random_llava.py llava-llama3-8b-instruct /data/llava-random     # ~16 GB bf16
    python -m train.tiny --out /data/tiny                                                   # a small dataset
    vramplan run --auto --model /data/llava-random --dataset /data/tiny/data.json \\
        --images /data/tiny/images --seq-len 2048 --samples 64 --output /data/runs/z2
    vramplan calibrate /data/runs/z2          # measured vs estimated, per component

Copy the run dir's report.json into benchmarks/results/ with the command lines above.
`--layers N` keeps the real widths but only N decoder/vision layers (a quick check of this script, or a
smaller model of the same widths and vocabulary). `--config-only` writes config.json and the processor
without weights: what `vramplan estimate --model DIR` reads, on any machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", help="a vramplan LLaVA model profile, e.g. llava-llama3-8b-instruct")
    ap.add_argument("out", help="output dir (config.json, model.safetensors shards, processor)")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: the profile's)")
    ap.add_argument("--config-only", action="store_true", help="config.json and processor only, no weights")
    a = ap.parse_args()

    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from vramplan.inputs.profiles import load_model

    m = load_model(a.profile)
    t, v = m.text, m.vision
    text = LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=a.layers or t.num_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, vocab_size=t.vocab_size,
                       tie_word_embeddings=t.tie_word_embeddings, max_position_embeddings=t.max_position_embeddings)
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=a.layers or v.num_layers, num_attention_heads=v.num_attention_heads,
                              image_size=v.image_size, patch_size=v.patch_size)
    cfg = LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=v.feature_layer,
                      image_token_index=t.vocab_size - 1, image_seq_length=v.num_patches)
    out = Path(a.out)
    CLIPImageProcessor(size={"shortest_edge": v.image_size},
                       crop_size={"height": v.image_size, "width": v.image_size}).save_pretrained(out)
    if a.config_only:
        cfg.dtype = torch.bfloat16  # as the random weights are saved
        cfg.save_pretrained(out)
        print(f"{out}: config.json and processor of {a.profile} ({text.num_hidden_layers} LLM layers), no weights")
        return
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)  # random init, bf16 like the real checkpoints
    model.save_pretrained(out, max_shard_size="5GB")
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {n:,} parameters (profile {a.profile}, {text.num_hidden_layers} LLM layers); "
          "add the tokenizer of the real model (tokenizer.json) to train on text")


if __name__ == "__main__":
    main()
