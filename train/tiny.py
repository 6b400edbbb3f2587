"""A tiny LLaVA (random weights, locally trained tokenizer) and a small PIL image dataset.

`python -m train.tiny --out DIR [--samples N] [--parts]` writes:
  DIR/model/        HF LLaVA dir (LlavaForConditionalGeneration + LlavaProcessor), ~1 MB
  DIR/data.json     LLaVA-format conversations, DIR/images/*.png (shapes on gray)
  DIR/parts/        with --parts: llm/ (LlamaForCausalLM + tokenizer without <image>), clip/
                    (CLIPVisionModel + image processor), projector_xtuner.safetensors
                    (`projector.model.0/2.*`), projector_xtuner.pth, mm_projector.bin (`model.mm_projector.0/2.*`)
Nothing is downloaded. The image is 28 px with patch 14: 4 patches, 4 image tokens after dropping CLS
(vision_feature_select_strategy "default", like LLaVA-1.5's 576 = (336/14)^2).
`build_decoder(family, tokenizer)` is a 2-layer decoder alone of each family the trainer trains
(DECODER_CONFIGS), `write_text_dataset` its text-only data in LLaVA or `messages` form, and
`build_tokenizer(chat_template=True)` carries a ChatML chat template (Qwen's, tokenizer_config.json), and
`build_llava_next(tokenizer, DIR)` writes a tiny LLaVA-NeXT (anyres).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

IMAGE_SIZE = 28
PATCH = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>",
           "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
# ChatML (the chat_template of Qwen2's tokenizer_config.json, without its default system prompt)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# transformers config class -> extra keys, per decoder family the trainer trains (vramplan.contract
# TRAINER_TEXT_FAMILIES); the family's own quirks on: Qwen2 qkv bias, Qwen3 q/k norm, Gemma head_dim and GeGLU
DECODER_CONFIGS = {"llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", {"sliding_window": 64}),
                   "qwen2": ("Qwen2Config", {}), "qwen3": ("Qwen3Config", {"head_dim": 16}),
                   "gemma": ("GemmaConfig", {"head_dim": 16}), "gemma2": ("Gemma2Config", {"head_dim": 16}),
                   "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16}),
                   "phi3": ("Phi3Config", {})}
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: ASSISTANT: system user assistant Describe the image. What shape is this? What color is it?",
] + [f"A {c} {s} on a gray background. It is {c}. It is a {s}." for c in COLORS for s in SHAPES]


def build_tokenizer(with_image_token: bool = True, chat_template: bool = False):
    """Byte-level BPE trained on a few sentences; `<image>` is added last (id = base vocab size).
    `chat_template`: with the ChatML chat template (CHATML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    kw = {"extra_special_tokens": {"image_token": "<image>"}} if with_image_token else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", **kw)
    if with_image_token and fast.convert_tokens_to_ids("<image>") in (None, fast.unk_token_id):
        fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if chat_template:
        fast.chat_template = CHATML
    return fast


def build_decoder(family: str, tokenizer, seed: int = 0):
    """A 2-layer `family` decoder (DECODER_CONFIGS) for `tokenizer`, random weights (AutoModelForCausalLM)."""
    import torch
    import transformers

    name, extra = DECODER_CONFIGS[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, name)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def write_text_dataset(path: Path, samples: int = 8, messages: bool = False) -> Path:
    """Text-only chat records about the shapes: LLaVA `conversations` (no image) or `messages` (with a system turn)."""
    records = []
    for i in range(samples):
        color, shape = list(COLORS)[i % len(COLORS)], SHAPES[i % 2]
        turns = [("user", "What shape is this?"), ("assistant", f"It is a {shape}."),
                 ("user", "What color is it?"), ("assistant", f"It is {color}.")]
        if messages:
            msgs = [{"role": "system", "content": "A chat between a curious user and an artificial intelligence "
                                                  "assistant."}] + [{"role": r, "content": t} for r, t in turns]
            records.append({"id": f"text-{i}", "messages": msgs})
        else:
            records.append({"id": f"text-{i}", "conversations": [
                {"from": "human" if r == "user" else "gpt", "value": t} for r, t in turns]})
    path.write_text(json.dumps(records, indent=1))
    return path


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                       tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():  # random init is N(0, 0.02); make the logits non-trivial but small
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    return model


GRID_PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # LLaVA-NeXT anyres grids at the tiny scale (336 px -> 28 px)


def build_llava_next(tokenizer, out: Path, seed: int = 0) -> Path:
    """A tiny LLaVA-NeXT dir (LlavaNextForConditionalGeneration + LlavaNextProcessor, anyres over
    GRID_PINPOINTS) with the tiny LLaVA's Llama and CLIP shapes, into `out`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    llava = build_model(tokenizer, seed).config
    cfg = transformers.LlavaNextConfig(
        vision_config=llava.vision_config, text_config=llava.text_config, image_token_index=llava.image_token_index,
        image_grid_pinpoints=GRID_PINPOINTS, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    transformers.LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
    ip_cls = getattr(transformers, "LlavaNextImageProcessorPil", None) or transformers.LlavaNextImageProcessor
    ip = ip_cls(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                image_grid_pinpoints=GRID_PINPOINTS)
    transformers.LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
                                    vision_feature_select_strategy="default", image_token="<image>",
                                    num_additional_image_tokens=1).save_pretrained(out)
    return out


def build_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_processor(tokenizer):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def write_dataset(out: Path, samples: int = 16, seed: int = 0, distinct: int | None = None) -> Path:
    """`data.json` + `images/`. `distinct` images/captions are repeated to `samples` records (like the
    XTuner tutorial's repeated data), which makes the loss go down reliably in a few steps."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    distinct = distinct or samples
    uniq = []
    for i in range(distinct):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        w, h = rng.choice([(40, 30), (30, 44), (36, 36)])  # non-square: exercises pad-to-square
        img = Image.new("RGB", (w, h), (128, 128, 128))
        d = ImageDraw.Draw(img)
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
        name = f"img_{i:04d}.png"
        img.save(images / name)
        uniq.append((name, color, shape))
    records = []
    for i in range(samples):
        name, color, shape = uniq[i % distinct]
        records.append({"id": f"tiny-{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A {color} {shape} on a gray background."},
            {"from": "human", "value": "What color is it?"},
            {"from": "gpt", "value": f"It is {color}."}]})
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_parts(model, tokenizer_no_image, out: Path) -> Path:
    """Split an HF LLaVA into the parts an assembly starts from (LLM dir, CLIP dir, projector files)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel, LlamaForCausalLM

    parts = out / "parts"
    n_base = len(tokenizer_no_image)
    text_cfg = model.config.text_config.__class__.from_dict(model.config.text_config.to_dict())
    text_cfg.vocab_size = n_base
    llm = LlamaForCausalLM(text_cfg)
    sd = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    sd["embed_tokens.weight"] = sd["embed_tokens.weight"][:n_base].clone()
    llm.model.load_state_dict(sd)
    llm.lm_head.weight.data.copy_(model.lm_head.weight.data[:n_base])
    llm.save_pretrained(parts / "llm")
    tokenizer_no_image.save_pretrained(parts / "llm")
    clip = CLIPVisionModel(model.config.vision_config)
    clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(parts / "clip")
    build_image_processor().save_pretrained(parts / "clip")
    proj = model.model.multi_modal_projector
    xt = {f"projector.model.{i}.{n}": getattr(lin, n).detach().clone().contiguous()
          for i, lin in ((0, proj.linear_1), (2, proj.linear_2)) for n in ("weight", "bias")}
    save_file(xt, str(parts / "projector_xtuner.safetensors"))
    torch.save(xt, parts / "projector_xtuner.pth")
    llava = {k.replace("projector.model.", "model.mm_projector."): v for k, v in xt.items()}
    torch.save(llava, parts / "mm_projector.bin")
    return parts


def build(out: str | Path, samples: int = 16, distinct: int | None = None, parts: bool = False,
          seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(True)
    model = build_model(tok, seed)
    model.save_pretrained(out / "model")
    build_processor(tok).save_pretrained(out / "model")
    write_dataset(out, samples, seed, distinct)
    if parts:
        write_parts(model, build_tokenizer(False), out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output dir (model/, data.json, images/)")
    ap.add_argument("--samples", type=int, default=16, help="dataset records (default 16)")
    ap.add_argument("--distinct", type=int, default=4, help="distinct images/captions, repeated (default 4)")
    ap.add_argument("--parts", action="store_true", help="also write parts/ (LLM dir, CLIP dir, projectors)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.samples < 1 or a.distinct < 1:
        ap.error("--samples and --distinct must be >= 1")
    out = build(a.out, a.samples, a.distinct, a.parts, a.seed)
    print(out.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
